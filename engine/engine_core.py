"""The engine loop shared by the offline `LLM` and the async native backend: add requests, step, emit deltas.

One `step()` is schedule -> run -> sample -> commit: the scheduler says what to run (a prefill of newly admitted
sequences, or one decode step over all running ones), the model runner runs it, the `Sampler` (engine/sampler.py)
picks the tokens, and the `OutputProcessor` (engine/output_processor.py) commits them, turning each sequence's new
tokens into a `CompletionDelta` (text from the incremental detokenizer, logprobs, finish state). Finished or
aborted sequences have already given their cache slot back when their delta is returned. With a draft model, a
decode step runs the `SpeculativeDecoder` (engine/spec_decode.py) over the target and draft runners instead, and
commits the tokens it accepts.

Steps are pipelined: a step is launched (forward and sampling queued on the device, the sampled tokens written to
a per-slot device buffer that the next step reads as its input, their copy to the host started) and the previous
step's tokens are collected afterwards, so the host's work on step N (detokenizing, finishing, scheduling) runs
while the device computes step N+1. The host therefore learns of a finish one step late: a sequence that stopped
on EOS or a stop string gets one extra token computed and dropped (one that ends by length is never launched past
its end). Requests whose sampling needs the token values of the step before (repetition/presence/frequency
penalties), structured outputs (the grammar mask of the next step needs the token just sampled) and speculative
decoding run unpipelined: launch, then collect at once. Constrained rows get their grammar's token mask
(engine/structured.py) on the logits before sampling; a batch without them never touches it.
"""

from __future__ import annotations

import threading

import torch

from engine.backend import CompletionDelta, EngineStats
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.host_copy import to_device
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor
from engine.paged_cache import BLOCK_SIZE, BlockTables, PagedKVCache
from engine.sampler import Sampler
from engine.sampling import SamplerOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.spec_decode import SpeculativeDecoder
from engine.structured import StructuredOutputs
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
    """(memory budget, bytes one sequence of max_len tokens takes). The default budget: half the free GPU memory,
    or 2 GiB on the CPU."""
    cfg = model.config
    param = next(model.parameters())
    per_slot = KVCache.bytes_per_slot(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_len, param.dtype
    )
    if memory_bytes is None:
        memory_bytes = torch.cuda.mem_get_info(param.device)[0] // 2 if param.device.type == "cuda" else 2 << 30
    return memory_bytes, per_slot


def paged_caches(
    config: EngineConfig, model: MiniMindForCausalLM, draft: MiniMindForCausalLM | None, max_len: int, spare: int
) -> tuple[PagedKVCache, PagedKVCache | None]:
    """Target and draft block caches sharing one block pool of as many blocks as the memory budget holds (no more
    than max_num_seqs sequences of max_len tokens can use, and never fewer than one such sequence needs)."""
    device = next(model.parameters()).device
    per_block = 0
    for m in (model, draft):
        if m is not None:
            cfg = m.config
            dtype = next(m.parameters()).dtype
            per_block += PagedKVCache.bytes_per_block(
                cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype
            )
    budget, _ = kv_cache_budget(model, max_len, config.kv_cache_memory)
    per_seq = -(-max_len // BLOCK_SIZE)
    num_blocks = max(per_seq, min(budget // per_block, config.max_num_seqs * per_seq)) + 1  # + the null block
    tables = BlockTables(
        config.max_num_seqs,
        max_len,
        num_blocks,
        device,
        enable_prefix_caching=config.enable_prefix_caching,
        lookahead=spare,
    )
    target = PagedKVCache.for_model(model, tables, device)
    return target, None if draft is None else PagedKVCache.for_model(draft, tables, device)


def check_images(model: MiniMindForCausalLM, prompt_token_ids: list[int], images: torch.Tensor) -> None:
    """A text-only model, or placeholders that do not match the images, is the request's error."""
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        raise InvalidRequestError("this model does not accept images (it has no vision encoder); send text only")
    slots = sum(1 for t in prompt_token_ids if t == image_token_id)
    if slots != images.shape[0] * model.config.image_token_len:
        raise InvalidRequestError(
            f"the prompt has {slots} image placeholder tokens for {images.shape[0]} image(s); each image needs "
            f"{model.config.image_token_len}"
        )


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
        # How many sequences run at once: max_num_seqs, or fewer if their caches do not fit in the budget.
        self.kv_cache_budget, self.kv_bytes_per_seq = kv_cache_budget(model, cache_len, config.kv_cache_memory)
        self.max_num_seqs = config.max_num_seqs
        draft_cache = None
        if config.kv_cache == "paged":
            self.cache, draft_cache = paged_caches(config, model, draft_model, cache_len, spare)
        else:
            slots = max(1, min(config.max_num_seqs, self.kv_cache_budget // self.kv_bytes_per_seq))
            self.cache = KVCache.for_model(model, slots, cache_len, self.device)
            if draft_model is not None:  # same slots as the target's
                draft_cache = KVCache.for_model(draft_model, slots, cache_len, self.device)
        slots = self.cache.num_slots
        cuda_graphs, compile_model = config.cuda_graphs, config.compile_model
        self.runner = ModelRunner(model, self.cache, cuda_graphs, max(2, spare), compile_model, cpu_layouts)
        self.scheduler = Scheduler(self.cache, max_model_len, config.max_queue, config.max_prefill_tokens)
        self.sampler = Sampler(self.vocab_size, self.eos_ids, self.device)
        self.structured = StructuredOutputs(tokenizer, self.vocab_size, self.eos_ids)
        self.output = OutputProcessor(tokenizer, self.scheduler)
        self.spec = None
        if draft_model is not None:
            draft_runner = ModelRunner(draft_model, draft_cache, cuda_graphs, 2, compile_model)
            self.spec = SpeculativeDecoder(self.runner, draft_runner, config.num_speculative_tokens, self.sampler)
        self.slot_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # each slot's newest token
        self.pending: Launched | None = None  # the step launched last, tokens not yet collected
        self._history_seqs: list[Sequence] = []  # live sequences whose sampling reads their output tokens
        self._constrained_seqs: list[Sequence] = []  # live sequences with a structured-outputs grammar
        self.lock = threading.RLock()  # one thread at a time drives the model (engine loop vs. embed)
        # Steps run, by kind (EngineStats, /metrics): with requests arriving a few at a time, many small prefill
        # steps where one large one would do show here.
        self.prefill_steps = self.decode_steps = 0

    # ---- requests ---------------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        images: torch.Tensor | None = None,
    ) -> list[Sequence]:
        """Queue a request's n sequences; raises PromptTooLongError / QueueFullError / InvalidRequestError before
        queueing anything. `images` ([images, 3, H, W]) fill the prompt's image placeholders (VLMs only)."""
        if images is not None:
            check_images(self.model, prompt_token_ids, images)
        with self.lock:
            self.scheduler.check(len(prompt_token_ids), params.max_tokens, params.n)
            seqs = [
                Sequence(request_id, i, list(prompt_token_ids), params, self.max_model_len, prompt=prompt)
                for i in range(params.n)
            ]
            for seq in seqs:
                seq.images = images  # whichever sequence leads the request's prefill brings them
                seq.detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params, self.eos_ids)
                if params.structured_outputs is not None:
                    seq.matcher = self.structured.matcher(params.structured_outputs)
            self.scheduler.add(seqs)
            if needs_output_history(params):
                self._history_seqs.extend(seqs)
            if params.structured_outputs is not None:
                self._constrained_seqs.extend(seqs)
            return seqs

    def abort(self, request_id: str) -> list[CompletionDelta]:
        """Finish a request's live sequences now (their cache is freed) and return their final deltas."""
        with self.lock:
            seqs = self.scheduler.abort(request_id)
            return [self.output.aborted(seq) for seq in seqs]

    def stats(self) -> EngineStats:
        """The scheduler's and the cache's counts now (the server's /metrics reads them at scrape time)."""
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            cache_usage=self.cache.usage,
            free_slots=self.cache.num_free,
            prefix_cache_queries=self.cache.prefix_cache_queries,
            prefix_cache_hits=self.cache.prefix_cache_hits,
            prefill_steps=self.prefill_steps,
            decode_steps=self.decode_steps,
        )

    def has_work(self) -> bool:
        """Requests waiting or running, or a launched step whose tokens someone still needs."""
        if self.scheduler.has_work():
            return True
        return self.pending is not None and not all(s.is_finished for s in self.pending.seqs)

    # ---- one step ---------------------------------------------------------------------------------------------------

    def step(self) -> list[CompletionDelta]:
        """schedule -> run -> sample -> commit. Pipelined, a step commits the tokens of the step launched before it
        (see the module doc); unpipelined, it commits that one first, then its own at once."""
        with self.lock:
            pipelined = self._pipelined()
            deltas = [] if pipelined else self._commit(self._take_pending())
            kind, seqs = self.scheduler.schedule()
            if kind == "decode":
                seqs = [s for s in seqs if s.max_new_tokens() > s.num_pending]  # not launched past their last token
            launched = None
            if seqs and kind == "prefill":
                self.prefill_steps += 1
                seqs, logits = self._prefill(seqs)
                if seqs:
                    launched = self._sample(seqs, logits, prefill=True)
            elif seqs and self.spec is not None:
                self.decode_steps += 1
                deltas += self._speculate(seqs)
            elif seqs:
                self.decode_steps += 1
                launched = self._sample(seqs, self._run(seqs, pipelined))
            if pipelined:
                deltas += self._commit(self._take_pending())
                self.pending = launched
            else:
                deltas += self._commit(launched)
            return deltas

    def _pipelined(self) -> bool:
        if self.spec is not None:
            return False
        if self._history_seqs:
            self._history_seqs = [s for s in self._history_seqs if not s.is_finished]
        if self._constrained_seqs:
            self._constrained_seqs = [s for s in self._constrained_seqs if not s.is_finished]
        return not self._history_seqs and not self._constrained_seqs

    def _run(self, seqs: list[Sequence], pipelined: bool) -> torch.Tensor:
        """The model's next-token logits [B, V] for one decode step of these sequences."""
        slots = [s.slot for s in seqs]
        if pipelined:  # the inputs are the tokens the last step sampled, still on the device
            starts = [len(s.prompt_token_ids) + len(s.output_token_ids) + s.num_pending - 1 for s in seqs]
            return self.runner.step(slots, self._slot_rows(self.slot_tokens, slots)[:, None], starts)[:, 0]
        return self.runner.step(slots, [[s.last_token] for s in seqs], [s.num_tokens - 1 for s in seqs])[:, 0]

    def _prefill(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Compute each sequence's scheduled prompt tokens; returns the sequences whose prompt is now complete and
        their next-token logits [B, V] (None when the step only advanced chunks of longer prompts)."""
        # Completions of one request (n > 1) share the prompt: prefill it once, copy the cache to the others.
        leaders: dict[str, int] = {}
        rows: list[int] = []
        for seq in seqs:
            rows.append(leaders.setdefault(seq.request_id, len(leaders)))
        firsts = [next(s for s in seqs if s.request_id == rid) for rid in leaders]
        want_full = [s.params.prompt_logprobs is not None for s in firsts]
        images = [s.images for s in firsts]
        starts = [s.num_computed_tokens for s in firsts]
        chunks = [s.prompt_token_ids[a : a + s.num_scheduled_tokens] for s, a in zip(firsts, starts)]
        slots = [s.slot for s in firsts]
        last, full = self.runner.prefill(chunks, slots, want_full, images, starts)
        if self.spec is not None:
            self.spec.draft.prefill(chunks, slots, [False] * len(chunks), None, starts)
        done: list[Sequence] = []
        done_rows: list[int] = []
        for seq, row in zip(seqs, rows):
            leader = firsts[row]
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.images = None  # the features now live in the KV cache
            if seq is not leader:
                self.cache.copy_slot(leader.slot, seq.slot, seq.num_prompt_tokens)
                if self.spec is not None:
                    self.spec.draft.cache.copy_slot(leader.slot, seq.slot, seq.num_prompt_tokens)
            self.cache.computed(seq)
            if seq.is_prefilled:
                if seq.index == 0 and full[row] is not None:
                    seq.prompt_logprobs = self.output.prompt_logprobs(seq, full[row])
                done.append(seq)
                done_rows.append(row)
        if not done:
            return done, None
        return done, last[to_device(done_rows, last.device)]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, prefill: bool = False) -> Launched:
        """Queue sampling from logits [B, V]: the tokens go to the slots' input buffer and start copying to the host."""
        if self._constrained_seqs and any(s.matcher is not None for s in seqs):
            logits = self.structured.mask_logits([s.matcher for s in seqs], logits)
        out = self.sampler(seqs, logits)
        if len(seqs) == 1 or [s.slot for s in seqs] == list(range(len(seqs))):
            self.slot_tokens[seqs[0].slot : seqs[0].slot + len(seqs)].copy_(out.token_ids)
        else:
            self.slot_tokens[to_device([s.slot for s in seqs], self.device)] = out.token_ids
        for seq in seqs:
            seq.num_pending += 1
        return Launched(seqs, to_host(out), self.device, prefill)

    def _commit(self, launched: Launched | None) -> list[CompletionDelta]:
        """Wait for a launched step's tokens and append them to their sequences."""
        return [] if launched is None else self.output.commit(launched.seqs, launched.wait(), launched.prefill)

    def _take_pending(self) -> Launched | None:
        launched, self.pending = self.pending, None
        return launched

    def _speculate(self, seqs: list[Sequence]) -> list[CompletionDelta]:
        """A speculative decode step: the decoder's accepted tokens, the sampler's for the rows it leaves out."""
        tokens, target_logits = self.spec.step(seqs)
        plain = [i for i, t in enumerate(tokens) if t is None]
        deltas: dict[int, CompletionDelta] = {}
        if plain:
            sampled = self._commit(self._sample([seqs[i] for i in plain], target_logits[plain, 0]))
            deltas.update(zip(plain, sampled))
        for i, accepted in enumerate(tokens):
            if accepted is not None:
                deltas[i] = self.output.append(seqs[i], accepted, [None] * len(accepted))
        return [deltas[i] for i in range(len(seqs))]

    def _slot_rows(self, tensor: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """tensor's rows of these slots: a view when they are 0..B-1 (the usual decode batch), else a gather."""
        if slots == list(range(len(slots))):
            return tensor[: len(slots)]
        return tensor[to_device(slots, self.device)]
