"""Batched sampling as pure tensor functions: penalties -> temperature -> top-k -> top-p -> min-p -> sample.

Every per-request control is a [B] tensor in `SamplingTensors`, so one code path serves 1 or 256 requests
and can be captured in a CUDA graph: `sample()` never reads a tensor back to the host. The Python-level
flags (`do_top_k`, ...) only skip work that no row needs; a caller capturing a graph builds the tensors
with `all_features=True` so the captured graph is valid for any later batch.

Randomness without host syncs or per-request generators: row b at decode step t draws one uniform number
u from a counter-based hash of (seed_b, t) and takes the token where the cumulative distribution crosses
u (inverse-CDF sampling: a cumsum and a binary search). A request's samples therefore depend only on its
own seed and step, never on its batch neighbours or on when it joined the batch. Requests without a seed
get a random one drawn on the host when their tensors are built. (gpt-fast's argmax(probs / Exponential)
needs a random number per vocabulary entry; hashing those cost ~60 elementwise kernels over [B, V],
measured 6x slower on an H100, so one number per row it is.)

Semantics follow vLLM:
- temperature 0 is greedy: argmax of the penalised logits, no randomness.
- top_k 0 is off; top_p keeps the smallest set of most likely tokens whose mass reaches p (after top-k);
  min_p drops tokens whose probability is below min_p times the most likely token's.
- repetition_penalty (HF/MiniMind): for tokens seen in prompt or output, logit > 0 is divided by it,
  logit <= 0 multiplied. presence/frequency penalties (OpenAI) count OUTPUT tokens only:
  logit -= frequency * count + presence * (count > 0).
- min_tokens: EOS and stop_token_ids are masked until the request has generated that many tokens.
- logprobs are those of the raw model distribution (log_softmax of the logits before penalties,
  temperature and truncation), vLLM's default, so they do not change with the sampling settings; rows with
  logprobs_mode "processed" get those of the distribution they were sampled from instead (vLLM's
  processed_logprobs), the sampling policy's log-probabilities that RL's importance ratios need.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.host_copy import to_device
from engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
_HASH_MULT = 0x45D9F3B  # small enough that (x < 2**32) * mult never overflows int64


@dataclass
class SamplingTensors:
    """Per-row sampling controls, each a [B] tensor on the logits' device (see `from_params`)."""

    temperature: torch.Tensor  # float32; 1.0 on greedy rows (they never divide by it)
    greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # int64; vocab_size when off
    top_p: torch.Tensor  # float32; 1.0 when off
    min_p: torch.Tensor  # float32; 0.0 when off
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    min_tokens: torch.Tensor  # int64
    stop_ids: torch.Tensor  # int64 [B, S]: EOS + stop_token_ids masked under min_tokens, padded with vocab_size
    seeds: torch.Tensor  # int64 in [0, 2**32): each row's seed folded to a 32-bit key (`seed_key`)
    host_seeds: torch.Tensor | None = None  # the same keys on the host (`Sampler` draws the step's uniforms there)
    # Python flags: skip work no row needs. Never read from tensors, so they cost no host sync.
    do_penalties: bool = True
    do_top_k: bool = True
    do_top_p: bool = True
    do_min_p: bool = True
    do_min_tokens: bool = True
    all_greedy: bool = False
    any_greedy: bool = True  # False: no row needs the argmax (nor the greedy/sampled choice per row)
    num_logprobs: int | None = None  # top-N logprobs to return (max over rows); None: no logprobs at all
    processed_logprobs: torch.Tensor | None = None  # bool [B]: rows whose logprobs are the sampled distribution's
    all_processed_logprobs: bool = False  # every row's are: the raw distribution's are never needed

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams],
        vocab_size: int,
        device: torch.device | str = "cpu",
        *,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        sample_indices: list[int] | None = None,
        all_features: bool = False,
    ) -> SamplingTensors:
        """One row per sequence. `sample_indices[i]` is which of its request's `n` completions row i is:
        rows of one seeded request get distinct seeds (index 0 keeps the request's seed itself), so n > 1
        gives n different samples that are still reproducible. `all_features` keeps every stage on
        (for CUDA graph capture)."""
        indices = sample_indices if sample_indices is not None else [0] * len(params)
        if len(indices) != len(params):
            raise ValueError(f"sample_indices has {len(indices)} entries for {len(params)} params")
        rows = [SamplingRow.of(p, i, vocab_size, eos_token_ids) for p, i in zip(params, indices)]
        return cls.from_rows(rows, vocab_size, device, all_features=all_features)

    @classmethod
    def from_rows(
        cls, rows: list[SamplingRow], vocab_size: int, device: torch.device | str = "cpu", *, all_features: bool = False
    ) -> SamplingTensors:
        """The tensors of rows made once per sequence (engine/sampler.py keeps them, so that a batch that changes
        every step, as many streams coming and going make it, only restacks them). Three uploads: the numeric
        controls as one [B, 10] table split on the device, the seeds, the stop ids."""
        if rows:
            table = torch.stack([r.values for r in rows])
        else:
            table = torch.empty(0, len(ROW_COLUMNS), dtype=torch.float64)
        on_device = to_device(table, device)
        column = {name: on_device[:, i] for i, name in enumerate(ROW_COLUMNS)}
        width = max((len(r.stops) for r in rows), default=0)
        if width == 0:  # EOS ignored and no stop ids: one column of padding
            stop_ids = torch.full((len(rows), 1), vocab_size, dtype=torch.int64)
        else:  # one flat list: a nested one costs torch.tensor several times as much
            flat = [t for r in rows for t in r.stops + [vocab_size] * (width - len(r.stops))]
            stop_ids = torch.tensor(flat, dtype=torch.int64).view(len(rows), width)
        host_seeds = torch.tensor([r.seed for r in rows], dtype=torch.int64)
        num_logprobs = max((r.logprobs for r in rows if r.logprobs is not None), default=None)
        neutral = torch.tensor(ROW_NEUTRAL, dtype=torch.float64)
        neutral[ROW_COLUMNS.index("top_k")] = vocab_size  # top-k over the whole vocabulary does nothing
        needed = dict(zip(ROW_COLUMNS, table.ne(neutral).any(dim=0).tolist()))  # does any row turn the stage on
        everywhere = dict(zip(ROW_COLUMNS, table.ne(0).all(dim=0).tolist()))  # (for the 0/1 columns) is every row 1
        return cls(
            temperature=column["temperature"].float(),
            greedy=column["greedy"].bool(),
            top_k=column["top_k"].long(),
            top_p=column["top_p"].float(),
            min_p=column["min_p"].float(),
            repetition_penalty=column["repetition_penalty"].float(),
            presence_penalty=column["presence_penalty"].float(),
            frequency_penalty=column["frequency_penalty"].float(),
            min_tokens=column["min_tokens"].long(),
            stop_ids=to_device(stop_ids, device),
            seeds=to_device(host_seeds, device),
            host_seeds=host_seeds,
            do_penalties=all_features
            or needed["repetition_penalty"]
            or needed["presence_penalty"]
            or needed["frequency_penalty"],
            do_top_k=all_features or needed["top_k"],
            do_top_p=all_features or needed["top_p"],
            do_min_p=all_features or needed["min_p"],
            do_min_tokens=all_features or needed["min_tokens"],
            all_greedy=not all_features and everywhere["greedy"],
            any_greedy=all_features or needed["greedy"],
            num_logprobs=num_logprobs,
            processed_logprobs=column["processed"].bool() if needed["processed"] else None,
            all_processed_logprobs=not all_features and everywhere["processed"],
        )


# The numeric controls of a row, in `SamplingRow.values` order, and each one's value when it does nothing (a column
# that differs from it in any row turns its stage on).
ROW_COLUMNS = (
    "temperature",
    "greedy",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "processed",
)
ROW_NEUTRAL = (1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # top_k's is the vocabulary size (`from_rows`)


@dataclass
class SamplingRow:
    """One sequence's sampling controls as plain numbers (see `SamplingTensors.from_rows`)."""

    values: torch.Tensor  # float64 [len(ROW_COLUMNS)], on the host
    seed: int  # the row's 32-bit key (`seed_key`); an unseeded request draws its seed once, here
    stops: list[int]  # EOS (unless ignored) and stop_token_ids, sorted
    logprobs: int | None

    @classmethod
    def of(
        cls, p: SamplingParams, index: int, vocab_size: int, eos_token_ids: list[int] | tuple[int, ...] = ()
    ) -> SamplingRow:
        top_k = p.top_k if 0 < p.top_k < vocab_size else vocab_size  # the whole vocabulary: off
        values = (
            p.temperature if p.temperature > 0 else 1.0,
            float(p.temperature == 0),
            top_k,
            p.top_p,
            p.min_p,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
            p.min_tokens,
            float(p.logprobs_mode == "processed"),
        )
        stops = sorted(set(p.stop_token_ids) if p.ignore_eos else set(eos_token_ids) | set(p.stop_token_ids))
        return cls(torch.tensor(values, dtype=torch.float64), seed_key(row_seed(p.seed, index)), stops, p.logprobs)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None = None  # float32 [B]: raw-model logprob of the chosen token
    top_token_ids: torch.Tensor | None = None  # int64 [B, N], best first (N = SamplingTensors.num_logprobs)
    top_logprobs: torch.Tensor | None = None  # float32 [B, N]


def row_seed(seed: int | None, index: int = 0) -> int:
    """The seed of completion `index` of a request: its own seed for index 0, a fixed mix for the others,
    a fresh random one when the request has none (so unseeded requests still sample randomly)."""
    if seed is None:
        return random.getrandbits(63)
    seed %= 1 << 63
    if index == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (1 << 63)


def _hash32(x):
    """A 32-bit integer mixing function (Thomas Mueller's), on Python ints or int64 tensors holding values in
    [0, 2**32); elementwise, so it runs the same on CPU, GPU and in a CUDA graph. (torch has no
    counter-based RNG that takes a per-row key, hence this small hand-written one.)"""
    x = x ^ (x >> 16)
    x = (x * _HASH_MULT) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _HASH_MULT) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """Fold a 63-bit seed into the 32-bit key the device-side hash takes (done once, on the host)."""
    return _hash32((seed & _MASK32) ^ _hash32((seed >> 32) & _MASK32))


def _step_key(seeds: torch.Tensor, steps: torch.Tensor, salt: int) -> torch.Tensor:
    mixed = (steps.to(torch.int64) * 0x9E3779B1 + salt * 0x7F4A7C15) & _MASK32
    return _hash32(seeds ^ mixed)


def _to_unit(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # 24 bits: exact in float32, never 0 or 1


def row_uniform(seeds: torch.Tensor, steps: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """One uniform number in (0, 1) per row, [B], a pure function of (seed key, step, salt).
    `salt` separates independent draws at the same step (speculative decoding uses several)."""
    return _to_unit(_step_key(seeds, steps, salt))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, width: int, salt: int = 0) -> torch.Tensor:
    """[B, width] uniform numbers in (0, 1), a pure function of (seed key, step, column, salt)."""
    cols = _hash32(torch.arange(width, device=seeds.device, dtype=torch.int64) + 0x27D4EB2F)
    return _to_unit(_hash32(cols.unsqueeze(0) ^ _step_key(seeds, steps, salt).unsqueeze(1)))


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row the first token whose cumulative probability exceeds u * total.
    probs [B, V] need not be normalised; zero-probability tokens are never picked."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # Kept strictly below the total, so rounding in u * total can never step past the last likely token.
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, V] int32 histogram of each row's tokens (for the penalties); rows may differ in length."""
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.int32, device=device)
    width = max([len(ids) for ids in token_ids] + [1])
    padded = torch.tensor([ids + [vocab_size] * (width - len(ids)) for ids in token_ids], device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size].contiguous()


def record_tokens(counts: torch.Tensor, token_ids: torch.Tensor) -> None:
    """Add one sampled token per row ([B]) to the output histogram in place (host-sync free)."""
    counts.scatter_add_(1, token_ids.view(-1, 1), torch.ones_like(token_ids.view(-1, 1), dtype=counts.dtype))


def apply_penalties(
    logits: torch.Tensor,
    t: SamplingTensors,
    prompt_mask: torch.Tensor | None,
    output_counts: torch.Tensor | None,
) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens, presence/frequency over output tokens."""
    if output_counts is None:
        output_counts = torch.zeros_like(logits, dtype=torch.int32)
    in_output = output_counts > 0
    seen = in_output if prompt_mask is None else in_output | prompt_mask
    rp = t.repetition_penalty.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - t.frequency_penalty.unsqueeze(1) * output_counts.to(logits.dtype)
    return logits - t.presence_penalty.unsqueeze(1) * in_output.to(logits.dtype)


def apply_min_tokens(logits: torch.Tensor, t: SamplingTensors, output_lens: torch.Tensor) -> torch.Tensor:
    """Mask EOS and stop_token_ids on rows that have generated fewer than min_tokens tokens."""
    batch, vocab = logits.shape
    banned = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, t.stop_ids, True)
    banned = banned[:, :vocab] & (output_lens < t.min_tokens).unsqueeze(1)
    return logits.masked_fill(banned, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Top-k then top-p (on the distribution left by top-k), with one sort for both. Ties at the k-th
    value are all kept, as in vLLM; top-p always keeps the most likely token."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if t.do_top_k:
        kth = sorted_logits.gather(1, (vocab - t.top_k).clamp(0, vocab - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if t.do_top_p:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - t.top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * t.min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    t: SamplingTensors,
    output_lens: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (penalised logits, the final sampling distribution's logits). The first is what greedy rows
    take the argmax of; the second has temperature and truncation applied (-inf = excluded)."""
    logits = logits.float()
    if t.do_penalties:
        logits = apply_penalties(logits, t, prompt_mask, output_counts)
    if t.do_min_tokens:
        logits = apply_min_tokens(logits, t, output_lens)
    penalised = logits
    logits = logits / t.temperature.unsqueeze(1)
    if t.do_top_k or t.do_top_p:
        logits = apply_top_k_top_p(logits, t)
    if t.do_min_p:
        logits = apply_min_p(logits, t)
    return penalised, logits


def probs_for_sampling(
    logits: torch.Tensor,
    t: SamplingTensors,
    output_lens: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distribution each row actually samples from, [B, V] float32; one-hot on greedy rows.
    Speculative decoding needs it for both draft and target."""
    penalised, processed = process_logits(logits, t, output_lens, prompt_mask, output_counts)
    probs = processed.softmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(1, penalised.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(t.greedy.unsqueeze(1), one_hot, probs)


def sample(
    logits: torch.Tensor,
    t: SamplingTensors,
    output_lens: torch.Tensor | None,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> SamplerOutput:
    """Pick the next token of every row.

    logits: [B, V] for the next position. output_lens: [B] int64, tokens generated so far by each row
    (the step counter for the noise and for min_tokens). prompt_mask: [B, V] bool, tokens in the prompt
    (repetition penalty). output_counts: [B, V] int, histogram of the tokens generated so far (see
    `token_counts` / `record_tokens`). The penalty inputs may be None when `t.do_penalties` is False.
    uniforms: [B] float32, `row_uniform(t.seeds, output_lens)` computed already (the `Sampler` does it on the host:
    one upload instead of ~20 tiny kernels); output_lens may then be None unless `t.do_min_tokens`.
    """
    processed = None
    if t.all_greedy and not t.do_penalties and not t.do_min_tokens:
        token_ids = logits.argmax(dim=-1)  # nothing can change the argmax: skip the [B, V] passes
    else:
        penalised, processed = process_logits(logits, t, output_lens, prompt_mask, output_counts)
        if t.any_greedy:
            token_ids = penalised.argmax(dim=-1)
        if not t.all_greedy:
            u = row_uniform(t.seeds, output_lens) if uniforms is None else uniforms
            sampled = sample_from_probs(processed.softmax(dim=-1), u)
            token_ids = torch.where(t.greedy, token_ids, sampled) if t.any_greedy else sampled
    out = SamplerOutput(token_ids=token_ids)
    if t.num_logprobs is not None:
        if t.processed_logprobs is not None:
            if processed is None:
                processed = process_logits(logits, t, output_lens, prompt_mask, output_counts)[1]
            raw = processed.log_softmax(dim=-1)
            if not t.all_processed_logprobs:
                raw = torch.where(t.processed_logprobs.unsqueeze(1), raw, logits.float().log_softmax(dim=-1))
        else:
            raw = logits.float().log_softmax(dim=-1)
        out.logprobs = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        if t.num_logprobs > 0:
            out.top_logprobs, out.top_token_ids = raw.topk(t.num_logprobs, dim=-1)
    return out
