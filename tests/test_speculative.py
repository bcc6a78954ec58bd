"""Speculative acceptance: greedy identity, and sampled tokens distributed exactly as the target's."""

from __future__ import annotations

import torch

from engine.speculative import greedy_accept, rejection_sample

V, K = 6, 3


def one_hot(ids: torch.Tensor, vocab: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, vocab).float()


def reference_greedy(draft: list[int], target: list[int]) -> tuple[int, int]:
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target[accepted]:
        accepted += 1
    return accepted, target[accepted]


def test_greedy_accept_matches_reference_and_one_hot_rejection_sampling():
    gen = torch.Generator().manual_seed(0)
    draft = torch.randint(0, 3, (200, K), generator=gen)
    target = torch.randint(0, 3, (200, K + 1), generator=gen)
    target[:50, :K] = draft[:50]  # some rows accept everything
    num, nxt = greedy_accept(draft, target)
    for row in range(200):
        assert (num[row].item(), nxt[row].item()) == reference_greedy(draft[row].tolist(), target[row].tolist())
    # One-hot probabilities (greedy rows) through the general rule give the same result, whatever the seed.
    seeds = torch.arange(200)
    num2, nxt2 = rejection_sample(draft, one_hot(draft), one_hot(target), seeds, torch.zeros(200, dtype=torch.long))
    assert torch.equal(num, num2) and torch.equal(nxt, nxt2)
    assert (num[:50] == K).all()


def test_sampled_tokens_follow_the_target_distribution():
    """80,000 rounds with random p and q: the first emitted token is ~ p_1, the second (when a round emits
    one) ~ p_2, and the first acceptance rate is sum(min(p_1, q_1)). Deterministic: fixed seeds."""
    gen = torch.Generator().manual_seed(123)
    n = 80_000
    p = torch.rand(K + 1, V, generator=gen).pow(2)
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(K, V, generator=gen).pow(2)
    q = q / q.sum(-1, keepdim=True)
    draft = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=gen) for i in range(K)], dim=1)
    num, nxt = rejection_sample(
        draft, q.expand(n, K, V), p.expand(n, K + 1, V), torch.arange(n), torch.full((n,), 7, dtype=torch.long)
    )
    emitted = torch.cat([draft, torch.zeros(n, 1, dtype=torch.long)], dim=1)
    emitted[torch.arange(n), num] = nxt  # the row's tokens: draft[:num] + [next]

    def tv(tokens: torch.Tensor, expected: torch.Tensor) -> float:
        freq = torch.bincount(tokens, minlength=V).double() / len(tokens)
        return 0.5 * (freq - expected.double()).abs().sum().item()

    assert tv(emitted[:, 0], p[0]) < 0.01
    assert tv(emitted[num >= 1, 1], p[1]) < 0.015
    assert tv(emitted[num >= 2, 2], p[2]) < 0.02
    # Naive acceptance (always taking the draft) would give q_1 instead: make sure the test can tell them apart.
    assert tv(draft[:, 0], p[0]) > 0.05
    expected_rate = torch.minimum(p[0], q[0]).sum().item()
    assert abs((num >= 1).double().mean().item() - expected_rate) < 0.01


def test_all_accepted_draws_bonus_from_the_last_target_distribution():
    n = 5000
    q = torch.full((n, K, V), 1.0 / V)
    p = torch.full((n, K + 1, V), 1.0 / V)  # p == q: always accepted
    p[:, K] = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, 0.0])
    draft = torch.randint(0, V, (n, K), generator=torch.Generator().manual_seed(1))
    num, nxt = rejection_sample(draft, q, p, torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert (num == K).all()
    assert set(nxt.tolist()) == {2, 3}


def test_same_seed_and_step_reproduce():
    gen = torch.Generator().manual_seed(4)
    q = torch.softmax(torch.randn(1, K, V, generator=gen), -1)
    p = torch.softmax(torch.randn(1, K + 1, V, generator=gen), -1)
    draft = torch.tensor([[1, 2, 3]])
    runs = {
        tuple(t.item() for t in rejection_sample(draft, q, p, torch.tensor([9]), torch.tensor([s]))) for s in range(40)
    }
    assert len(runs) > 1  # different steps draw differently
    a = rejection_sample(draft, q, p, torch.tensor([9]), torch.tensor([3]))
    b = rejection_sample(draft, q, p, torch.tensor([9]), torch.tensor([3]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
