"""The engine loop shared by the offline `LLM` and the async native backend: add requests, step, emit deltas.

One `step()` asks the scheduler what to run (a prefill of newly admitted sequences, or one decode step over all
running ones), runs it through the model runner, samples, and turns each sequence's new tokens into a
`CompletionDelta` (text from the incremental detokenizer, logprobs, finish state). Finished or aborted sequences
have already given their cache slot back when their delta is returned.

Steps are pipelined: a step is launched (forward and sampling queued on the device, the sampled tokens written to
a per-slot device buffer that the next step reads as its input, their copy to the host started) and the previous
step's tokens are collected afterwards, so the host's work on step N (detokenizing, finishing, scheduling) runs
while the device computes step N+1. The host therefore learns of a finish one step late: a sequence that stopped
on EOS or a stop string gets one extra token computed and dropped (one that ends by length is never launched past
its end). Requests whose sampling needs the token values of the step before (repetition/presence/frequency
penalties) and speculative decoding run unpipelined: launch, then collect at once.
"""

from __future__ import annotations

import threading

import torch

from engine.backend import CompletionDelta, TokenLogprob
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.sampling import SamplerOutput, SamplingTensors, sample, token_counts
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from models.model import MiniMindForCausalLM


def eos_token_ids(model: MiniMindForCausalLM, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation/config EOS ids."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        model.config.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def kv_cache_budget(model: MiniMindForCausalLM, max_len: int, memory_bytes: int | None) -> tuple[int, int]:
    """(memory budget, bytes one sequence's slot takes). The default budget: half the free GPU memory, or 2 GiB on
    the CPU."""
    cfg = model.config
    param = next(model.parameters())
    per_slot = KVCache.bytes_per_slot(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_len, param.dtype
    )
    if memory_bytes is None:
        memory_bytes = torch.cuda.mem_get_info(param.device)[0] // 2 if param.device.type == "cuda" else 2 << 30
    return memory_bytes, per_slot


def needs_output_history(params: SamplingParams) -> bool:
    """Sampling that reads the tokens generated so far (so the next step cannot be launched before they are known)."""
    return params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0


def to_host(out: SamplerOutput) -> SamplerOutput:
    """Start copying a step's sampler output to the host without waiting (pinned memory on a GPU)."""

    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to("cpu", non_blocking=True)

    return SamplerOutput(copy(out.token_ids), copy(out.logprobs), copy(out.top_token_ids), copy(out.top_logprobs))


class Launched:
    """A step whose sampled tokens are on their way to the host; `wait()` returns them there."""

    def __init__(self, seqs: list[Sequence], host: SamplerOutput, device: torch.device, prefill: bool) -> None:
        self.seqs, self.host, self.prefill = seqs, host, prefill
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> SamplerOutput:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class EngineCore:
    def __init__(
        self,
        model: MiniMindForCausalLM,
        tokenizer,
        config: EngineConfig,
        *,
        draft_model: MiniMindForCausalLM | None = None,
        cpu_layouts=None,
    ) -> None:
        """Made by engine/build.py `build_engine`, which loads the models and settles `config.max_model_len`."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_model_len = max_model_len = config.max_model_len
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.eos_ids = eos_token_ids(model, tokenizer)
        # Speculative verification writes up to k positions past the last token: leave room for them.
        spare = config.num_speculative_tokens + 1 if draft_model is not None else 0
        cache_len = max_model_len + spare
        # How many sequences run at once: max_num_seqs, or fewer if their slots do not fit in the budget.
        self.kv_cache_budget, self.kv_bytes_per_seq = kv_cache_budget(model, cache_len, config.kv_cache_memory)
        self.max_num_seqs = config.max_num_seqs
        slots = max(1, min(config.max_num_seqs, self.kv_cache_budget // self.kv_bytes_per_seq))
        cfg = model.config
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(
            cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim, cache_len, dtype, self.device
        )
        cuda_graphs, compile_model = config.cuda_graphs, config.compile_model
        self.runner = ModelRunner(model, self.cache, cuda_graphs, max(2, spare), compile_model, cpu_layouts)
        self.scheduler = Scheduler(self.cache, max_model_len, config.max_queue, config.max_prefill_tokens)
        self.spec = None
        if draft_model is not None:
            from engine.spec_decode import SpeculativeDecoder

            self.spec = SpeculativeDecoder(self, draft_model, config.num_speculative_tokens, cuda_graphs, compile_model)
        self.slot_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # each slot's newest token
        self.pending: Launched | None = None  # the step launched last, tokens not yet collected
        self._history_seqs: list[Sequence] = []  # live sequences whose sampling reads their output tokens
        self.lock = threading.RLock()  # one thread at a time drives the model (engine loop vs. embed)
        self._tensors_key: tuple[int, ...] = ()
        self._tensors: SamplingTensors | None = None

    # ---- requests ---------------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> list[Sequence]:
        """Queue a request's n sequences; raises PromptTooLongError / QueueFullError before queueing anything."""
        with self.lock:
            self.scheduler.check(len(prompt_token_ids), params.max_tokens, params.n)
            seqs = [
                Sequence(request_id, i, list(prompt_token_ids), params, self.max_model_len, prompt=prompt)
                for i in range(params.n)
            ]
            for seq in seqs:
                seq.detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params, self.eos_ids)
            self.scheduler.add(seqs)
            if needs_output_history(params):
                self._history_seqs.extend(seqs)
            return seqs

    def abort(self, request_id: str) -> list[CompletionDelta]:
        """Finish a request's live sequences now (their cache is freed) and return their final deltas."""
        with self.lock:
            seqs = self.scheduler.abort(request_id)
            return [self._delta(seq, [], seq.detok.finish("abort"), None) for seq in seqs]

    def has_work(self) -> bool:
        """Requests waiting or running, or a launched step whose tokens someone still needs."""
        if self.scheduler.has_work():
            return True
        return self.pending is not None and not all(s.is_finished for s in self.pending.seqs)

    # ---- one step ---------------------------------------------------------------------------------------------------

    def step(self) -> list[CompletionDelta]:
        """Launch the next step, then return the deltas of the one launched before it (see the module doc)."""
        with self.lock:
            if self._unpipelined():
                return self._collect_pending() + self._step_now()
            launched = self._launch()
            deltas = self._collect_pending()
            self.pending = launched
            return deltas

    def _unpipelined(self) -> bool:
        if self.spec is not None:
            return True
        if self._history_seqs:
            self._history_seqs = [s for s in self._history_seqs if not s.is_finished]
        return bool(self._history_seqs)

    def _launch(self) -> Launched | None:
        kind, seqs = self.scheduler.schedule()
        if kind == "prefill":
            return self._prefill(seqs)
        seqs = [s for s in seqs if s.max_new_tokens() > s.num_pending]  # not launched past their last token
        if not seqs:
            return None
        slots = [s.slot for s in seqs]
        starts = [len(s.prompt_token_ids) + len(s.output_token_ids) + s.num_pending - 1 for s in seqs]
        logits = self.runner.step(slots, self._slot_rows(self.slot_tokens, slots)[:, None], starts)
        return self.launch_sample(seqs, logits[:, 0])

    def _step_now(self) -> list[CompletionDelta]:
        """One unpipelined step: tokens of the last step are on the host and feed this one."""
        kind, seqs = self.scheduler.schedule()
        if not seqs:
            return []
        if kind == "prefill":
            return self.collect(self._prefill(seqs))
        if self.spec is not None:
            return self.spec.step(seqs)
        logits = self.runner.step(
            [s.slot for s in seqs], [[s.last_token] for s in seqs], [s.num_tokens - 1 for s in seqs]
        )
        return self.process(seqs, logits[:, 0])

    def _collect_pending(self) -> list[CompletionDelta]:
        launched, self.pending = self.pending, None
        return self.collect(launched) if launched is not None else []

    def _slot_rows(self, tensor: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """tensor's rows of these slots: a view when they are 0..B-1 (the usual decode batch), else a gather."""
        if slots == list(range(len(slots))):
            return tensor[: len(slots)]
        return tensor[torch.tensor(slots, device=self.device)]

    def _prefill(self, seqs: list[Sequence]) -> Launched:
        # Completions of one request (n > 1) share the prompt: prefill it once, copy the cache to the others.
        leaders: dict[str, int] = {}
        rows: list[int] = []
        for seq in seqs:
            rows.append(leaders.setdefault(seq.request_id, len(leaders)))
        firsts = [next(s for s in seqs if s.request_id == rid) for rid in leaders]
        want_full = [s.params.prompt_logprobs is not None for s in firsts]
        last, full = self.runner.prefill([s.prompt_token_ids for s in firsts], [s.slot for s in firsts], want_full)
        for seq, row in zip(seqs, rows):
            leader = firsts[row]
            if seq is not leader:
                self.cache.copy_slot(leader.slot, seq.slot, seq.num_prompt_tokens)
            seq.num_cached = seq.num_prompt_tokens
            if seq.index == 0 and full[row] is not None:
                seq.prompt_logprobs = self._prompt_logprobs(seq, full[row])
        if self.spec is not None:
            self.spec.prefill(seqs)
        return self.launch_sample(seqs, last[torch.tensor(rows, device=last.device)], prefill=True)

    # ---- sampling and output ----------------------------------------------------------------------------------------

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        """Per-row sampling controls, rebuilt only when the batch changes (a steady decode batch reuses them)."""
        key = tuple(s.seq_id for s in seqs)
        if key != self._tensors_key or self._tensors is None:
            self._tensors = SamplingTensors.from_params(
                [s.params for s in seqs],
                self.vocab_size,
                self.device,
                eos_token_ids=self.eos_ids,
                sample_indices=[s.index for s in seqs],
            )
            self._tensors_key = key
        return self._tensors

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SamplerOutput:
        t = self.sampling_tensors(seqs)
        if t.all_greedy and not t.do_penalties and not t.do_min_tokens and t.num_logprobs is None:
            return SamplerOutput(logits.argmax(dim=-1))  # the common greedy step: one kernel, nothing to upload
        output_lens = torch.tensor([len(s.output_token_ids) + s.num_pending for s in seqs], device=self.device)
        prompt_mask = counts = None
        if t.do_penalties:
            prompt_mask = token_counts([s.prompt_token_ids for s in seqs], self.vocab_size, self.device) > 0
            counts = token_counts([s.output_token_ids for s in seqs], self.vocab_size, self.device)
        return sample(logits, t, output_lens, prompt_mask, counts)

    def process(self, seqs: list[Sequence], logits: torch.Tensor) -> list[CompletionDelta]:
        """Sample one token per sequence from logits [B, V] and append it (or finish sequences with max_tokens=0)."""
        return self.collect(self.launch_sample(seqs, logits))

    def launch_sample(self, seqs: list[Sequence], logits: torch.Tensor, prefill: bool = False) -> Launched:
        """Queue sampling from logits [B, V]: the tokens go to the slots' input buffer and start copying to the host."""
        out = self.sample(seqs, logits)
        if len(seqs) == 1 or [s.slot for s in seqs] == list(range(len(seqs))):
            self.slot_tokens[seqs[0].slot : seqs[0].slot + len(seqs)].copy_(out.token_ids)
        else:
            self.slot_tokens[torch.tensor([s.slot for s in seqs], device=self.device)] = out.token_ids
        for seq in seqs:
            seq.num_pending += 1
        return Launched(seqs, to_host(out), self.device, prefill)

    def collect(self, launched: Launched) -> list[CompletionDelta]:
        """Wait for a launched step's tokens and append them to their sequences (dropped for finished ones)."""
        out = launched.wait()
        token_ids = out.token_ids.tolist()
        deltas = []
        finished = SequenceStatus.FINISHED
        for row, (seq, token) in enumerate(zip(launched.seqs, token_ids)):
            seq.num_pending -= 1
            if seq.status is finished:  # stopped or aborted after this step was launched
                continue
            if launched.prefill and seq.params.max_tokens == 0:  # prompt logprobs only
                seq.detok.finish("length")
                self.scheduler.finish(seq, "length")
                deltas.append(self._delta(seq, [], "", None))
                continue
            logprob = None if out.logprobs is None else self._logprob(out, row, token, seq.params.logprobs)
            deltas.append(self.append(seq, [token], [logprob]))
        return deltas

    def append(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob | None]) -> CompletionDelta:
        """Append tokens to a sequence (the detokenizer drops any after a stop), finishing it when it ends."""
        detok = seq.detok
        before = len(seq.output_token_ids)
        text = detok.add_tokens(tokens)
        kept = detok.token_ids[before:]
        # The context window can also end it (the detokenizer only knows max_tokens).
        room = seq.max_total_len - len(seq.prompt_token_ids) - before
        if len(kept) >= room and detok.finish_reason is None:
            kept = kept[:room]
            text += detok.finish("length")
        seq.output_token_ids.extend(kept)
        if detok.finish_reason is not None:
            self.scheduler.finish(seq, detok.finish_reason, detok.stop_reason)
        if seq.params.logprobs is None:
            return self._delta(seq, kept, text, None)
        kept_logprobs = [lp for lp in logprobs[: len(kept)] if lp is not None]
        seq.cumulative_logprob += sum(lp.logprob for lp in kept_logprobs)
        seq.logprobs = (seq.logprobs or []) + kept_logprobs
        return self._delta(seq, kept, text, kept_logprobs)

    def _delta(self, seq: Sequence, tokens: list[int], text: str, logprobs) -> CompletionDelta:
        seq.text += text
        first = len(seq.output_token_ids) == len(tokens)
        return CompletionDelta(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=tokens,
            logprobs=logprobs,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=len(seq.output_token_ids),
            prompt_logprobs=seq.prompt_logprobs if first else None,
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprob(self, out: SamplerOutput, row: int, token: int, wanted: int | None) -> TokenLogprob | None:
        if wanted is None or out.logprobs is None:
            return None
        top = []
        if wanted > 0 and out.top_token_ids is not None:
            ids = out.top_token_ids[row, :wanted].tolist()
            values = out.top_logprobs[row, :wanted].tolist()
            top = [(i, self._token_text(i), v) for i, v in zip(ids, values)]
        return TokenLogprob(token, self._token_text(token), float(out.logprobs[row]), top)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> list[TokenLogprob | None]:
        """Logprob of each prompt token given the ones before it (None for the first), with top-N alternatives."""
        logprobs = logits.log_softmax(dim=-1)[:-1]
        targets = torch.tensor(seq.prompt_token_ids[1:], device=logits.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        wanted = seq.params.prompt_logprobs or 0
        top_values, top_ids = logprobs.topk(wanted, dim=-1) if wanted else (None, None)
        result: list[TokenLogprob | None] = [None]
        for i, token in enumerate(seq.prompt_token_ids[1:]):
            top = []
            if wanted:
                top = [(t, self._token_text(t), v) for t, v in zip(top_ids[i].tolist(), top_values[i].tolist())]
            result.append(TokenLogprob(token, self._token_text(token), chosen[i], top))
        return result
