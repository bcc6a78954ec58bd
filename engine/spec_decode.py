"""Speculative decoding as a mode of the engine: a small draft model proposes k tokens, the target checks them all in
one forward of k+1 tokens, and every accepted token saves one target step.

Cache bookkeeping, per sequence with n committed tokens (the last one not yet in either cache):
- the draft feeds its last two committed tokens (positions n-2, n-1; rewriting n-2 is harmless and makes the step
  shape the same whether or not the previous round accepted every draft token), then k-1 single tokens, giving
  d1..dk;
- the target feeds [x_{n-1}, d1..dk] from position n-1 and returns k+1 next-token distributions;
- a accepted drafts plus one token from the target are committed; positions written past them hold stale entries
  that the next round overwrites before any query can see them (the attention mask stops at the query position).

Acceptance (engine/speculative.py): rows sampled with temperature > 0 draw each draft token from the draft's
distribution q (the row's own temperature/top-k/top-p/min-p applied to the draft's logits) and accept it with
probability min(1, p/q) against the target's distribution p, resampling from norm(max(0, p - q)) at the first
rejection, so every token is distributed exactly as the target alone would sample it. Greedy rows are the special
case of one-hot p and q: drafts are accepted while they equal the target's argmax (a batch of greedy rows only
skips the probabilities). Rows with penalties (they need the token counts of every draft position), logprobs or a
grammar take one token sampled by the normal sampler from the target's first distribution (exact, just not faster).
"""

from __future__ import annotations

import torch

from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.sampling import probs_for_sampling
from engine.sequence import Sequence
from engine.speculative import greedy_accept, rejection_sample, sample_draft


def speculates(seq: Sequence) -> bool:
    """Rows whose next-token distribution is a function of the logits at one position (no penalties), that want no
    logprobs and follow no grammar (a constrained row's mask for draft token i+1 would need the matcher advanced by
    draft token i: such rows decode plainly, one masked token per step)."""
    p = seq.params
    plain = p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
    return plain and p.logprobs is None and seq.matcher is None


class SpeculativeDecoder:
    """Runs the draft and the target for one decode step and says which tokens each sequence commits; the engine
    samples the rows it cannot speculate and commits everything. The draft runner's cache has the target's
    slots: a sequence's slot indexes both."""

    def __init__(self, target: ModelRunner, draft: ModelRunner, k: int, sampler: Sampler) -> None:
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {k}")
        self.target, self.draft, self.k, self.sampler = target, draft, k, sampler
        self.proposed = 0
        self.accepted = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def step(self, seqs: list[Sequence]) -> tuple[list[list[int] | None], torch.Tensor]:
        """(tokens to commit per sequence, None where the normal sampler must pick one from the target's first
        position; the target's logits [B, k+1, V])."""
        k = self.k
        slots = [s.slot for s in seqs]
        n = [s.num_tokens for s in seqs]
        last_two = [(s.prompt_token_ids + s.output_token_ids)[-2:] for s in seqs]
        t = self.sampler.tensors(seqs)
        steps = None if t.all_greedy else torch.tensor([len(s.output_token_ids) for s in seqs], device=t.seeds.device)
        # Draft: k proposals, fed back on the device (no host sync between draft steps).
        drafts, draft_probs = [], []
        logits = self.draft.step(slots, last_two, [x - 2 for x in n])[:, -1]
        for i in range(k):
            if i:
                logits = self.draft.step(slots, drafts[-1][:, None], [x - 1 + i for x in n])[:, -1]
            if steps is None:
                drafts.append(logits.argmax(-1))
            else:
                token, q = sample_draft(logits, t, steps + i)
                drafts.append(token)
                draft_probs.append(q)
        proposal = torch.stack(drafts, dim=1)  # [B, k]
        first = torch.tensor([[s.last_token] for s in seqs], device=proposal.device)
        target_logits = self.target.step(slots, torch.cat([first, proposal], dim=1), [x - 1 for x in n])
        if steps is None:
            matches, bonus = greedy_accept(proposal, target_logits.argmax(-1))
        else:
            p = torch.stack([probs_for_sampling(target_logits[:, i], t, steps + i) for i in range(k + 1)], dim=1)
            matches, bonus = rejection_sample(proposal, torch.stack(draft_probs, dim=1), p, t.seeds, steps)
        proposal_h, bonus_h, matches_h = proposal.tolist(), bonus.tolist(), matches.tolist()
        tokens: list[list[int] | None] = []
        for i, seq in enumerate(seqs):
            if not speculates(seq):  # penalised / logprob / grammar rows: exact fallback, one sampled token
                tokens.append(None)
                continue
            a = matches_h[i]
            self.proposed += k
            self.accepted += a
            tokens.append(proposal_h[i][:a] + [bonus_h[i]])
        return tokens, target_logits
