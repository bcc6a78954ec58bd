"""The ppo stage: GAE, the clipped policy and value losses and the per-token rewards against direct computations on
small tensors, learning on a synthetic task, and exact resume (the critic's value head included)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.test_training_grpo import GRPO_FLAGS, say_task  # noqa: F401  (say_task is a fixture)
from tests.test_training_support import metrics, train
from training.checkpoint import load_checkpoint
from training.rl_losses import gae, policy_loss, value_loss, whiten


def direct_gae(rewards, values, gamma, lam):
    """One episode, written out: A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t."""
    n = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_equals_a_direct_computation_per_episode():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 2:6] = True  # a prompt before, padding after
    mask[1, 1:8] = True  # runs to the end of the row
    mask[2, 3:4] = True  # one token
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i in range(3):
        idx = mask[i].nonzero().flatten().tolist()
        expected = direct_gae(rewards[i, idx].tolist(), values[i, idx].tolist(), 0.9, 0.8)
        assert torch.allclose(adv[i, idx], torch.tensor(expected), atol=1e-5)
        assert torch.allclose(ret[i, idx], adv[i, idx] + values[i, idx])
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum())))
    # by hand: r = [0, 1], V = [0.5, 0.2], gamma 1, lam 1 -> A = [0 + 0.2 - 0.5 + (1 - 0.2), 1 - 0.2] = [0.5, 0.8]
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2, dtype=torch.bool), 1, 1)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8]])) and torch.allclose(ret, torch.tensor([[1.0, 1.0]]))


def test_clipped_policy_and_value_losses_by_hand():
    # ratios e^0.5 = 1.65 (clipped at 1.2 for A > 0), e^-0.5 = 0.61 (clipped at 0.8 for A < 0), 1.0 (inside)
    logps = torch.tensor([[-1.0, -2.0, -1.0]])
    old = torch.tensor([[-1.5, -1.5, -1.0]])
    adv = torch.tensor([[2.0, -1.0, 3.0]])
    loss, clipped = policy_loss("grpo", logps, old, adv, 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2 * 2.0, 0.8 * 1.0, -3.0]]))
    assert clipped.tolist() == [[True, True, False]]
    # the other side of the min: A > 0 with a small ratio, A < 0 with a large one are not clipped
    loss, clipped = policy_loss("grpo", old, logps, adv, 0.2, 0.2)
    assert torch.allclose(loss, -torch.exp(old - logps) * adv) and not clipped.any()
    v, v_old, ret = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.5, 0.5, 0.4]), torch.tensor([2.0, -1.0, 0.0])
    # clipped values: 0.7, 0.3, 0.5 -> max of (1, 0.09), (1, 1.69), (0.25, 0.25), halved
    assert torch.allclose(value_loss(v, v_old, ret, 0.2), torch.tensor([0.5 * 1.69, 0.5 * 1.69, 0.125]))


def test_whitened_advantages_have_zero_mean_unit_std_on_the_mask():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -5.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    w = whiten(x, mask)
    assert torch.allclose(w[mask].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(w[mask].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(w[~mask], torch.zeros(2))


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_on_every_token():
    from training.ppo import token_rewards

    mask = torch.tensor([[False, True, True, False], [False, False, False, False], [True, True, True, True]])
    old = torch.full((3, 4), -1.0)
    ref = torch.full((3, 4), -1.5)
    r = token_rewards(torch.tensor([2.0, 5.0, -1.0]), old, ref, mask, beta=0.1)
    expected = torch.tensor([[0, -0.05, 1.95, 0], [0, 0, 0, 0], [-0.05, -0.05, -0.05, -1.05]])
    assert torch.allclose(r, expected)
    assert torch.equal(
        token_rewards(torch.tensor([2.0, 5.0, -1.0]), old, None, mask, 0.1)[0], torch.tensor([0, 0, 2.0, 0])
    )


# ---- the stage ----------------------------------------------------------------------------------------------------

PPO_FLAGS = {**GRPO_FLAGS, "num_generations": 4, "batch_size": 8}


def test_ppo_raises_the_exact_match_reward_and_saves_the_policy_and_its_critic(tmp_path, say_task):  # noqa: F811
    from models.loader import load_model

    base, data = say_task
    run = train(tmp_path, "ppo", init_from=str(base), data_path=str(data), max_steps=40, lr=5e-3, beta=0.01,
                **PPO_FLAGS)  # fmt: skip
    rows = metrics(run)
    rewards = [row["reward"] for _, row in sorted(rows.items())]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last)
    for key in ("reward", "clip_fraction", "value_loss", "value", "kl", "reward/exact_match"):
        assert key in rows[40]
    assert rows[1]["value"] == 0.0 and rows[40]["value"] != 0.0  # the zero-initialised critic learned
    head = load_file(str(run / "final" / "critic" / "value_head.safetensors"))
    assert head["weight"].shape == (1, 32) and head["weight"].abs().sum() > 0
    model = load_model(run / "final")  # the policy alone: a plain causal LM checkpoint
    assert not hasattr(model, "value_head")


def test_sigkill_mid_ppo_then_resume_equals_an_uninterrupted_run(tmp_path, say_task):  # noqa: F811
    from tests.test_training_align_resume import run_killed_and_resumed

    base, data = say_task
    flags = dict(max_steps=12, save_every=5, keep_last=2, dropout=0.1, lr=5e-3, beta=0.04, grad_accum=2)
    run_killed_and_resumed(tmp_path, "ppo", data, init_from=str(base), **{**PPO_FLAGS, **flags})
    # the critic too: its saved head, and in the last step checkpoint its weights and AdamW moments
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    head = "final/critic/value_head.safetensors"
    assert_same_tensors(load_file(str(whole / head)), load_file(str(killed / head)))
    states = [load_checkpoint(run / "checkpoints" / "step-00000012") for run in (whole, killed)]
    assert {"value_head.weight", "value_head.bias"} <= set(states[0]["model"])
    assert_same_tensors(states[0]["model"], states[1]["model"])
    moments = [state["optimizer"]["state"] for state in states]
    assert {"value_head.weight", "value_head.bias"} <= set(moments[0])
    for name in moments[0]:
        assert_same_tensors(moments[0][name], moments[1][name], name)
    assert moments[0]["value_head.weight"]["exp_avg"].abs().sum() > 0  # the critic was trained


def assert_same_tensors(left: dict, right: dict, where: str = "") -> None:
    assert left.keys() == right.keys(), where
    for key, value in left.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(right[key], value, atol=1e-6, rtol=0, msg=f"{where} {key}")
        else:
            assert right[key] == value, (where, key)
