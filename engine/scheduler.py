"""Continuous batching: which sequences run in the next step.

Sequences wait in a bounded FIFO queue; between steps the scheduler admits as many as free KV-cache slots and the
prefill token budget allow, runs their prefill as one step, and otherwise runs one decode step over everything that
is running. A finished or cancelled sequence gives its slot back at once, so the next step can admit a waiting one.
"""

from __future__ import annotations

from collections import deque

from engine.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from engine.kv_cache import KVCache
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(
        self, cache: KVCache, max_model_len: int, max_queue: int | None = None, max_prefill_tokens: int = 8192
    ):
        self.cache = cache
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
        """("prefill", newly admitted sequences) when any can be admitted, else ("decode", running sequences)."""
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and self.cache.num_free > 0:
            seq = self.waiting[0]
            if admitted and tokens + seq.num_prompt_tokens > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            seq.slot = self.cache.allocate()
            seq.status = SequenceStatus.RUNNING
            tokens += seq.num_prompt_tokens
            admitted.append(seq)
        if admitted:
            self.running.extend(admitted)
            return "prefill", admitted
        # In slot order: a batch holding slots 0..B-1 then reads the cache as one slice (no gather).
        return "decode", sorted(self.running, key=lambda s: s.slot)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark a sequence finished and free its cache slot now."""
        if seq.is_finished:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.cache.release(seq.slot)
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
