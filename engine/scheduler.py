"""Continuous batching: which sequences run in the next step.

Sequences wait in a bounded FIFO queue; between steps the scheduler admits as many as the KV cache (free slots, or
blocks for the paged cache) and the prefill token budget allow, runs their prefill as one step, and otherwise runs
one decode step over everything that is running. A finished or cancelled sequence gives its cache back at once, so
the next step can admit a waiting one.

Chunked prefill: a prompt longer than the budget (`max_prefill_tokens`, vLLM's max_num_batched_tokens) is prefilled
a budget-sized chunk per step, and between two chunks the running sequences take one decode step, so a long prompt
delays running streams by one chunk at a time instead of by its whole prefill. Only the first prompt of a prefill
batch is ever chunked (the others must fit whole), and prompts that need their whole prefill in one forward are
never chunked: n > 1 completions (one prefill copied to the others), images (placeholders must meet their features)
and prompt logprobs. With the paged cache, a prompt's cached prefix (engine/block_pool.py) is skipped.
"""

from __future__ import annotations

from collections import deque

from engine.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from engine.kv_cache import KVCache
from engine.paged_cache import PagedKVCache
from engine.sequence import Sequence, SequenceStatus


def chunkable(seq: Sequence) -> bool:
    return seq.params.n == 1 and seq.images is None and seq.params.prompt_logprobs is None


class Scheduler:
    def __init__(
        self,
        cache: KVCache | PagedKVCache,
        max_model_len: int,
        max_queue: int | None = None,
        max_prefill_tokens: int = 8192,
    ):
        self.cache = cache
        self._yield_to_decode = False  # the last step prefilled part of a prompt: let running sequences step
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def check(self, num_prompt_tokens: int, max_tokens: int | None, num_seqs: int) -> None:
        """Refuse a request before any work: over-long prompt or a full queue (raises, nothing is queued)."""
        if num_prompt_tokens == 0:
            raise PromptTooLongError("the prompt is empty: give at least one token", param="prompt")
        wanted = num_prompt_tokens + (max_tokens if max_tokens is not None else 1)
        if num_prompt_tokens >= self.max_model_len or wanted > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens and max_tokens is {max_tokens}, but the context window "
                f"(max_model_len) is {self.max_model_len} tokens: shorten the prompt, lower max_tokens, or raise "
                f"max_model_len",
                param="prompt" if num_prompt_tokens >= self.max_model_len else "max_tokens",
            )
        if self.max_queue and num_seqs > self.max_queue:  # 0: no waiting room, every request is "full"
            raise InvalidRequestError(
                f"the request has {num_seqs} sequences (n) but at most {self.max_queue} can wait (max_queue): "
                f"lower n or raise max_queue",
                param="n",
            )
        if self.max_queue is not None and len(self.waiting) + num_seqs > self.max_queue:
            raise QueueFullError(
                f"the waiting queue is full ({len(self.waiting)} of {self.max_queue} sequences waiting): "
                f"retry later or raise max_queue"
            )

    def add(self, seqs: list[Sequence]) -> None:
        self.check(seqs[0].num_prompt_tokens, seqs[0].params.max_tokens, len(seqs))
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[str, list[Sequence]]:
        """("prefill", sequences with prompt tokens to compute now, each `num_scheduled_tokens` of them) when any
        prompt work is due, else ("decode", running sequences whose prompt is done)."""
        if not (self._yield_to_decode and any(s.is_prefilled for s in self.running)):
            batch = self._prefill_batch()
            if batch:
                self._yield_to_decode = any(
                    s.num_computed_tokens + s.num_scheduled_tokens < s.num_prompt_tokens for s in batch
                )
                return "prefill", batch
        self._yield_to_decode = False
        # In slot order: a batch holding slots 0..B-1 then reads the cache as one slice (no gather).
        seqs = sorted((s for s in self.running if s.is_prefilled), key=lambda s: s.slot)
        for seq in seqs:  # back the position this step writes (the paged cache takes a block when one fills)
            self.cache.grow(seq, seq.num_tokens + seq.num_pending)
        return "decode", seqs

    def _prefill_batch(self) -> list[Sequence]:
        budget = self.max_prefill_tokens
        batch: list[Sequence] = []
        for seq in self.running:  # the next chunk of a prompt prefilled in chunks
            if not seq.is_prefilled:
                budget -= self._schedule_prompt(seq, budget)
                batch.append(seq)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if (batch and seq.num_prompt_tokens > budget) or not self.cache.can_admit(seq):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = self.cache.admit(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= self._schedule_prompt(seq, budget)
            batch.append(seq)
        return batch

    def _schedule_prompt(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_prompt_tokens - seq.num_computed_tokens
        take = min(remaining, budget) if chunkable(seq) else remaining
        seq.num_scheduled_tokens = take
        self.cache.grow(seq, seq.num_computed_tokens + take)
        return take

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark a sequence finished and free its cache slot now."""
        if seq.is_finished:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq)
            seq.slot = -1
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of a request with reason "abort"; returns those that were still live."""
        live = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in live:
            self.finish(seq, "abort")
        return live
