"""`OutputProcessor`: commits sampled tokens to their sequences and turns them into `CompletionDelta`s.

Per token: the incremental detokenizer adds its text (and drops tokens after a stop string or EOS), the context
window may end the sequence, a finished sequence gives its cache slot back (through the scheduler) at once, and
the logprobs the request asked for are attached.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.backend import CompletionDelta, TokenLogprob
from engine.sampling import SamplerOutput
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.structured import StructuredOutputs


class OutputProcessor:
    def __init__(self, tokenizer: Any, scheduler: Scheduler) -> None:
        self.tokenizer, self.scheduler = tokenizer, scheduler

    def commit(self, seqs: list[Sequence], out: SamplerOutput, prefill: bool) -> list[CompletionDelta]:
        """Append one sampled token per sequence (out is on the host); dropped for sequences finished meanwhile."""
        token_ids = out.token_ids.tolist()
        # Whole-batch host lists once: indexing a tensor per row costs microseconds, which at 48 rows and 1,000
        # steps is a visible share of a rollout.
        logprobs = None if out.logprobs is None else out.logprobs.tolist()
        top_ids = top_values = None
        if out.top_token_ids is not None:
            top_ids, top_values = out.top_token_ids.tolist(), out.top_logprobs.tolist()
        deltas = []
        append, finished = self.append, SequenceStatus.FINISHED  # (per row per step: no repeated lookups)
        for row, (seq, token) in enumerate(zip(seqs, token_ids)):
            seq.num_pending -= 1
            if seq.status is finished:  # stopped or aborted after this step was launched
                continue
            params = seq.params
            if prefill and params.max_tokens == 0:  # prompt logprobs only
                seq.detok.finish("length")
                self.scheduler.finish(seq, "length")
                deltas.append(self.delta(seq, [], "", None))
                continue
            wanted = params.logprobs
            if logprobs is None or wanted is None:
                deltas.append(append(seq, [token], [None]))
            else:
                top = (
                    [] if not wanted or top_ids is None else list(zip(top_ids[row][:wanted], top_values[row][:wanted]))
                )
                deltas.append(append(seq, [token], [self._logprob(seq, token, logprobs[row], top)]))
        return deltas

    def append(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob | None]) -> CompletionDelta:
        """Append tokens to a sequence (the detokenizer drops any after a stop), finishing it when it ends."""
        detok = seq.detok
        before = len(seq.output_token_ids)
        text = detok.add_tokens(tokens)
        kept = detok.token_ids[before:]
        if seq.matcher is not None and StructuredOutputs.advance(seq.matcher, kept) and detok.finish_reason is None:
            text += detok.finish("stop")  # the grammar ended without EOS (e.g. ignore_eos): nothing more may follow
        # The context window can also end it (the detokenizer only knows max_tokens).
        room = seq.max_total_len - len(seq.prompt_token_ids) - before
        if len(kept) >= room and detok.finish_reason is None:
            kept = kept[:room]
            text += detok.finish("length")
        seq.output_token_ids.extend(kept)
        if detok.finish_reason is not None:
            self.scheduler.finish(seq, detok.finish_reason, detok.stop_reason)
        if seq.params.logprobs is None:
            return self.delta(seq, kept, text, None)
        kept_logprobs = [lp for lp in logprobs[: len(kept)] if lp is not None]
        for lp in kept_logprobs:
            seq.cumulative_logprob += lp.logprob
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.extend(kept_logprobs)  # in place: a copy per token made long completions quadratic
        return self.delta(seq, kept, text, kept_logprobs)

    def aborted(self, seq: Sequence) -> CompletionDelta:
        """The final delta of a sequence the scheduler has just aborted."""
        return self.delta(seq, [], seq.detok.finish("abort"), None)

    def delta(self, seq: Sequence, tokens: list[int], text: str, logprobs) -> CompletionDelta:
        generated = len(seq.output_token_ids)
        prompt_logprobs = seq.prompt_logprobs
        if prompt_logprobs is not None and generated != len(tokens):  # only on the first delta
            prompt_logprobs = None
        return CompletionDelta(  # positional (CompletionDelta's field order): one per row per step, kwargs cost more
            seq.request_id,
            seq.index,
            text,
            tokens,
            logprobs,
            seq.status is SequenceStatus.FINISHED,
            seq.finish_reason,
            seq.stop_reason,
            len(seq.prompt_token_ids),
            generated,
            prompt_logprobs,
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprob(self, seq: Sequence, token: int, value: float, top: list[tuple[int, float]]) -> TokenLogprob:
        """The chosen token's logprob and its top alternatives; token texts are left empty for requests that asked
        for no text (`detokenize=False`), as a decode per token is most of their host work."""
        if not seq.params.detokenize:
            return TokenLogprob(token, "", value, [(i, "", v) for i, v in top])
        text = self._token_text
        return TokenLogprob(token, text(token), value, [(i, text(i), v) for i, v in top])

    def prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> list[TokenLogprob | None]:
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
