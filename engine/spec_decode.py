"""Speculative decoding as a mode of the engine: a small draft model proposes k tokens, the target checks them all in
one forward of k+1 tokens, and every accepted token saves one target step.

Cache bookkeeping, per sequence with n committed tokens (the last one not yet in either cache):
- the draft feeds its last two committed tokens (positions n-2, n-1; rewriting n-2 is harmless and makes the step
  shape the same whether or not the previous round accepted every draft token), then k-1 single tokens, giving
  d1..dk;
- the target feeds [x_{n-1}, d1..dk] from position n-1 and returns k+1 next-token distributions;
- a accepted drafts plus one token from the target are committed; positions written past them hold stale entries
  that the next round overwrites before any query can see them (the attention mask stops at the query position).

Acceptance: a greedy row (temperature 0, no penalties) accepts drafts while they equal the target's argmax, then
takes the target's argmax, so its output is exactly the target's greedy output. Other rows take one token sampled
by the normal sampler from the target's first distribution (plain decoding: exact, just not faster).
"""

from __future__ import annotations

import torch

from engine.model_runner import ModelRunner
from engine.sequence import Sequence


def speculates(seq: Sequence) -> bool:
    """Rows whose next token is a pure function of the logits at one position (greedy without penalties), and
    that want no logprobs and follow no grammar (a constrained row's mask for draft token i+1 would need the
    matcher advanced by draft token i: such rows decode plainly, one masked token per step)."""
    p = seq.params
    greedy = p.temperature == 0 and p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
    return greedy and p.logprobs is None and seq.matcher is None


class SpeculativeDecoder:
    """Runs the draft and the target for one decode step and says which tokens each sequence commits; the engine
    samples the rows it cannot speculate and commits everything. The draft runner's cache has the target's
    slots: a sequence's slot indexes both."""

    def __init__(self, target: ModelRunner, draft: ModelRunner, k: int) -> None:
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {k}")
        self.target, self.draft, self.k = target, draft, k
        self.proposed = 0
        self.accepted = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def prefill(self, seqs: list[Sequence]) -> None:
        self.draft.prefill([s.prompt_token_ids for s in seqs], [s.slot for s in seqs], [False] * len(seqs))

    def step(self, seqs: list[Sequence]) -> tuple[list[list[int] | None], torch.Tensor]:
        """(tokens to commit per sequence, None where the normal sampler must pick one from the target's first
        position; the target's logits [B, k+1, V])."""
        k = self.k
        slots = [s.slot for s in seqs]
        n = [s.num_tokens for s in seqs]
        last_two = [(s.prompt_token_ids + s.output_token_ids)[-2:] for s in seqs]
        # Draft: k greedy proposals, fed back on the device (no host sync between draft steps).
        drafts = [self.draft.step(slots, last_two, [x - 2 for x in n])[:, -1].argmax(-1)]
        for i in range(1, k):
            logits = self.draft.step(slots, drafts[-1][:, None], [x - 1 + i for x in n])
            drafts.append(logits[:, -1].argmax(-1))
        proposal = torch.stack(drafts, dim=1)  # [B, k]
        first = torch.tensor([[s.last_token] for s in seqs], device=proposal.device)
        target_logits = self.target.step(slots, torch.cat([first, proposal], dim=1), [x - 1 for x in n])
        target_best = target_logits.argmax(-1)  # [B, k+1]
        matches = (proposal == target_best[:, :k]).int().cumprod(dim=1).sum(dim=1)  # accepted prefix length
        proposal_h, best_h, matches_h = proposal.tolist(), target_best.tolist(), matches.tolist()
        tokens: list[list[int] | None] = []
        for i, seq in enumerate(seqs):
            if not speculates(seq):  # sampled / penalised / logprob rows: exact fallback, one sampled token
                tokens.append(None)
                continue
            a = matches_h[i]
            self.proposed += k
            self.accepted += a
            tokens.append(proposal_h[i][:a] + [best_h[i][a]])
        return tokens, target_logits
