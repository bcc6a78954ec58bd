"""Acceptance math of speculative decoding (Leviathan et al. 2023; Chen et al. 2023), as batched tensor ops.

The draft proposed k tokens x_1..x_k, each sampled from its distribution q_i; the target scored the same
positions plus one more in a single forward, giving p_1..p_{k+1}. Token x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)), in order, until the first rejection. At the first rejected position the
replacement is drawn from norm(max(0, p_i - q_i)); if all k were accepted a bonus token is drawn from
p_{k+1}. Every emitted token is then distributed exactly as the target alone would have sampled it.

Greedy needs no special case: with one-hot p and q (what `sampling.probs_for_sampling` gives greedy rows)
a draft token is accepted iff it equals the target's argmax, and the replacement is the target's argmax.
`greedy_accept` states that rule on token ids for callers that never build probabilities.

Randomness comes from `sampling.uniform_noise` / `row_uniform` keyed by (seed, step), so no host sync and no per-row
generator is needed, and a seeded request stays reproducible.
"""

from __future__ import annotations

import torch

from engine.sampling import SamplingTensors, probs_for_sampling, row_uniform, sample_from_probs, uniform_noise

_SALT_ACCEPT, _SALT_RESAMPLE, _SALT_DRAFT = 101, 102, 103  # keep these draws apart from the sampler's own (salt 0)


def sample_draft(logits: torch.Tensor, t: SamplingTensors, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft token per row from the draft's logits [B, V] under the rows' sampling settings; returns
    (token [B], q [B, V], the distribution it was drawn from). `steps`: [B] the output position it proposes for.
    A draw at a step whose earlier draft was rejected is never looked at, so reusing that step's number in the next
    round keeps the draws independent."""
    q = probs_for_sampling(logits, t, steps)
    return sample_from_probs(q, row_uniform(t.seeds, steps, salt=_SALT_DRAFT)), q


def rejection_sample(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify k draft tokens per row.

    draft_token_ids: [B, k] int64; draft_probs: [B, k, V] (q_i, the distributions they were sampled from);
    target_probs: [B, k+1, V] (p_i, after the request's own penalties/temperature/top-k/top-p);
    seeds, steps: [B] int64 (`SamplingTensors.seeds`, i.e. seed keys, and the row's output length before
    this round).

    Returns (num_accepted [B] in 0..k, next_token [B]): the row emits
    draft_token_ids[:num_accepted] followed by next_token.
    """
    batch, k = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    p = target_probs[:, :k].gather(2, draft_token_ids.unsqueeze(-1)).squeeze(-1)
    q = draft_probs.gather(2, draft_token_ids.unsqueeze(-1)).squeeze(-1)
    u = uniform_noise(seeds, steps, k, salt=_SALT_ACCEPT)
    accepted = u * q < p  # u < p / q without dividing by q
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)

    # Distribution of the next token: the residual at the first rejection, or p_{k+1} after k acceptances.
    index = num_accepted.view(batch, 1, 1).expand(batch, 1, vocab)
    p_next = target_probs.gather(1, index).squeeze(1)
    q_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (p_next - q_padded.gather(1, index).squeeze(1)).clamp(min=0)
    # A rejection implies p(x) < q(x), so the residual has mass unless rounding ate it; then fall back to p.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    next_token = sample_from_probs(residual, row_uniform(seeds, steps, salt=_SALT_RESAMPLE))
    return num_accepted, next_token


def greedy_accept(draft_token_ids: torch.Tensor, target_token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: draft_token_ids [B, k], target_token_ids [B, k+1] (the target's argmax at each
    position). Accepts while they agree; the next token is the target's argmax at the first disagreement
    (or its bonus token). Returns (num_accepted [B], next_token [B])."""
    k = draft_token_ids.shape[1]
    agree = draft_token_ids == target_token_ids[:, :k]
    num_accepted = agree.to(torch.int64).cumprod(dim=1).sum(dim=1)
    next_token = target_token_ids.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return num_accepted, next_token
