"""The grpo stage: its losses against a direct formulation and TRL's GRPOTrainer, group-normalised advantages,
rewards, rollouts on the native engine over the policy's own (updated) weights with the log-probabilities the
trainer recomputes, and learning on a synthetic task."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from tests.test_training_support import TINY_MODEL, WORDS, metrics, tokenizer_dir, train, write_jsonl
from training.data import IGNORE
from training.rl_losses import group_advantages, k3_kl, masked_sum, policy_loss

WORDS8 = sorted(set(WORDS))[:8]


def rl_inputs(seed: int = 0, rows: int = 6, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(rows, width, generator=g) * 3).requires_grad_()
    old = logps.detach() + torch.randn(rows, width, generator=g) * 0.3  # ratios well inside and outside the clip
    ref = logps.detach() + torch.randn(rows, width, generator=g) * 0.2
    adv = torch.randn(rows, generator=g)
    mask = torch.rand(rows, width, generator=g) > 0.3
    mask[:, 0] = True
    return logps, old, ref, adv, mask


def direct_loss(kind, logps, old, ref, adv, mask, eps, eps_high, beta, norm):
    """The objective written out token by token."""
    total = 0.0
    for i in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logps[i, t] - old[i, t])
            if kind == "grpo":
                term = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps_high) * adv[i])
            else:
                term = -torch.clamp(ratio, max=eps_high).detach() * adv[i] * logps[i, t]
            d = ref[i, t] - logps[i, t]
            terms.append(term + beta * (torch.exp(d) - d - 1))
        total = total + (sum(terms) / len(terms) if norm == "sequence" else sum(terms))
    return total


@pytest.mark.parametrize("kind,eps_high", [("grpo", 0.2), ("grpo", 0.28), ("cispo", 1.2)])
@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_grpo_and_cispo_losses_equal_a_direct_formulation(kind, eps_high, norm):
    logps, old, ref, adv, mask = rl_inputs()
    per_token, clipped = policy_loss(kind, logps, old, adv, 0.2, eps_high, ref, beta=0.04)
    ours = masked_sum(per_token, mask, norm)
    (grad_ours,) = torch.autograd.grad(ours, logps)
    direct = direct_loss(kind, logps, old, ref, adv, mask, 0.2, eps_high, 0.04, norm)
    (grad_direct,) = torch.autograd.grad(direct, logps)
    assert torch.allclose(ours, direct, atol=1e-5)
    assert torch.allclose(grad_ours, grad_direct, atol=1e-5)
    assert clipped[mask].any() and not clipped[mask].all()  # the inputs exercise the clip


class TRLLossHarness:
    """The attributes GRPOTrainer._compute_loss reads, so its loss runs on given per-token log-probabilities."""

    def __init__(self, loss_type, logps, beta, eps, eps_high):
        from trl.trainer.grpo_trainer import GRPOTrainer

        self.compute = types.MethodType(GRPOTrainer._compute_loss, self)
        self.logps = logps
        self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = loss_type, beta, eps, eps_high
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.importance_sampling_level, self.use_vllm, self.aux_loss_enabled = "token", False, False
        self._entropy_bonus_enabled = False
        self.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        self.model = types.SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.accelerator = types.SimpleNamespace(
            num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x, gather_for_metrics=lambda x: x
        )
        self._metrics = {"train": __import__("collections").defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
        return self.logps, torch.zeros_like(self.logps), None


@pytest.mark.parametrize("ours,trl_type", [("sequence", "grpo"), ("token", "bnpo"), ("token", "cispo")])
def test_losses_equal_trls_grpo_trainer_loss(ours, trl_type):
    logps, old, ref, adv, mask = rl_inputs(seed=1)
    kind, eps_high = ("cispo", 1.2) if trl_type == "cispo" else ("grpo", 0.28)
    rows, width = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    trl_loss = TRLLossHarness(trl_type, logps, 0.04, 0.2, eps_high).compute(None, inputs)
    per_token, _ = policy_loss(kind, logps, old, adv, 0.2, eps_high, ref, beta=0.04)
    count = rows if ours == "sequence" else int(mask.sum())
    assert abs(float(masked_sum(per_token, mask, ours).detach()) / count - float(trl_loss.detach())) < 1e-5


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 7.0, 5.0, 7.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4).view(3, 4)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(adv[:2].std(1, unbiased=False), torch.ones(2), atol=1e-3)
    assert torch.equal(adv[2], torch.zeros(4))  # an all-equal group carries no signal
    assert adv[0, 0] > 0 > adv[0, 1]
    assert torch.allclose(adv[1], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    x = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3_kl(x, x), torch.zeros(3))
    assert (k3_kl(x, x + torch.tensor([0.3, -0.3, 0.1])) > 0).all()


# ---- rewards ------------------------------------------------------------------------------------------------------


def reward_of_length(sample) -> float:  # a user reward, imported by path
    return float(len(sample.completion))


def test_rule_rewards_and_a_user_function_compose_with_weights():
    from training.errors import TrainingError
    from training.rewards import RewardSet, Sample

    def sample(text, answer="42", ids=(1, 2, 3, 4)):
        return Sample([{"role": "user", "content": "q"}], answer, text, list(ids), "stop", 8)

    rs = RewardSet({"exact_match": 1.0, "numeric_match": 0.5, "format": 0.2, "length": 0.1, "repetition": 1.0})
    totals, parts = rs.score(
        [
            sample("<think>six sevens</think> 42"),
            sample("the answer is 42.0"),
            sample("41", ids=(5, 5, 5, 5, 5)),
        ]
    )
    assert parts["exact_match"] == [1.0, 0.0, 0.0]
    assert parts["numeric_match"] == [1.0, 1.0, 0.0]
    assert parts["format"] == [1.0, 0.0, 0.0]
    assert parts["length"] == [-0.5, -0.5, -0.625]
    assert parts["repetition"] == [0.0, 0.0, -2 / 3]
    assert totals[0] == pytest.approx(1.0 + 0.5 + 0.2 - 0.05)
    assert totals[2] == pytest.approx(-0.0625 - 2 / 3)
    user = RewardSet({"tests.test_training_grpo:reward_of_length": 2.0})
    assert user.score([sample("abc")])[0] == [6.0]
    with pytest.raises(TrainingError, match="unknown reward 'exact'"):
        RewardSet({"exact": 1.0})
    with pytest.raises(TrainingError, match="cannot import"):
        RewardSet({"tests.no_such_module:f": 1.0})


# ---- rollouts on the native engine --------------------------------------------------------------------------------


@pytest.fixture()
def policy():
    from models.loader import load_tokenizer
    from models.model import MiniMindForCausalLM
    from training.config import TrainConfig
    from training.setup import build_model

    tokenizer = load_tokenizer(tokenizer_dir())
    cfg = TrainConfig(tokenizer=str(tokenizer_dir()), model_config=dict(TINY_MODEL), seed=3, device="cpu")
    torch.manual_seed(3)
    model = build_model(cfg, tokenizer)
    assert isinstance(model, MiniMindForCausalLM)
    return model, tokenizer


def rollout_logps(model, tokenizer, engine, prompts, temperature, seed):
    """Engine completions and the trainer's recomputed log-probabilities of them (same rows, same positions)."""
    from engine.sampling_params import SamplingParams
    from training.grpo import completion_logps

    params = SamplingParams(
        n=3, temperature=temperature, max_tokens=12, seed=seed, logprobs=0, logprobs_mode="processed"
    )
    completions = engine.generate(prompts, params)
    engine_lp, trainer_lp = [], []
    with torch.no_grad():
        for c in completions:
            ids = prompts[c.prompt_index] + c.token_ids
            targets = torch.full((1, len(ids)), IGNORE)
            start = len(prompts[c.prompt_index]) - 1
            targets[0, start : start + len(c.token_ids)] = torch.tensor(c.token_ids)
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            trainer_lp.append(completion_logps(logits, targets, temperature)[0, start : start + len(c.token_ids)])
            engine_lp.append(torch.tensor(c.logprobs))
    return completions, torch.cat(engine_lp), torch.cat(trainer_lp)


def train_step(model, optimizer, ids: list[int]) -> None:
    """One optimizer step of plain next-token loss on `ids`: moves the policy away from its sampling weights."""
    batch = torch.tensor([ids])
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_engine_rollout_logprobs_equal_the_trainers_recomputation(policy):
    from training.rollout import RolloutEngine

    model, tokenizer = policy
    model.train()
    engine = RolloutEngine(model, tokenizer, max_model_len=64, kv_cache_bytes=1 << 20)
    assert model.training  # building the engine leaves the policy in training mode
    prompts = [tokenizer("the model reads")["input_ids"], tokenizer("text and")["input_ids"]]
    completions, engine_lp, trainer_lp = rollout_logps(model, tokenizer, engine, prompts, 0.7, seed=5)
    assert len(completions) == 6 and [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.token_ids) for c in completions}) > 2  # n seeded samples differ
    assert engine_lp.numel() > 20
    assert torch.allclose(engine_lp, trainer_lp, atol=1e-4), (engine_lp - trainer_lp).abs().max()
    assert model.training


def test_rollouts_without_engine_text_get_the_same_texts_tokens_and_logprobs(policy):
    """detokenize=False (what the grpo stage asks when it has no stop strings): the rollout decodes each completion
    once afterwards, and everything the trainer reads equals the token-by-token path, EOS-ended rows included."""
    from engine.sampling_params import SamplingParams
    from training.rollout import RolloutEngine

    model, tokenizer = policy
    engine = RolloutEngine(model, tokenizer, max_model_len=64, kv_cache_bytes=1 << 20)
    prompts = [tokenizer("the model reads")["input_ids"], tokenizer("text and")["input_ids"]]

    def run(detokenize: bool, stop_token_ids: list[int]) -> list:
        params = SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=3, logprobs=0, detokenize=detokenize,
                                stop_token_ids=stop_token_ids)  # fmt: skip
        return engine.generate(prompts, params)

    # the most frequent sampled token becomes a stop token: some rows end with "stop", the others with "length"
    sampled = [t for c in run(True, []) for t in c.token_ids]
    stop = [max(set(sampled), key=sampled.count)]
    with_text, without = run(True, stop), run(False, stop)
    assert [c.token_ids for c in without] == [c.token_ids for c in with_text]
    assert [c.logprobs for c in without] == [c.logprobs for c in with_text]
    assert [c.finish_reason for c in without] == [c.finish_reason for c in with_text]
    assert {c.finish_reason for c in with_text} == {"stop", "length"}, "the case needs both endings"
    assert [c.text for c in without] == [c.text for c in with_text] and any(c.text for c in with_text)


def test_rollouts_sample_from_the_weights_after_each_optimizer_step(policy):
    """The engine runs on the policy's parameters: after an optimizer step it samples the new policy."""
    from training.rollout import RolloutEngine

    model, tokenizer = policy
    engine = RolloutEngine(model, tokenizer, max_model_len=64, kv_cache_bytes=1 << 20)
    prompts = [tokenizer("the model reads")["input_ids"]]
    _, before, _ = rollout_logps(model, tokenizer, engine, prompts, 1.0, seed=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    for _ in range(2):
        train_step(model, optimizer, prompts[0] + prompts[0])
        completions, engine_lp, trainer_lp = rollout_logps(model, tokenizer, engine, prompts, 1.0, seed=9)
        assert torch.allclose(engine_lp, trainer_lp, atol=1e-4)
    assert not torch.allclose(before, engine_lp[: before.numel()], atol=1e-2)


def test_mixed_precision_rollouts_run_on_a_copy_in_the_autocast_dtype_that_follows_each_optimizer_step(policy):
    """fp32 parameters trained under bf16 autocast: the engine samples from a bf16 copy (as the trainer's forward
    computes), refreshed before each rollout, so its log-probabilities stay those of the current policy."""
    from training.rollout import RolloutEngine

    model, tokenizer = policy
    engine = RolloutEngine(model, tokenizer, max_model_len=64, kv_cache_bytes=1 << 20, dtype=torch.bfloat16)
    copy = engine.llm.model
    assert copy is not model and next(copy.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32 and model.training
    prompts = [tokenizer("the model reads")["input_ids"], tokenizer("text and")["input_ids"]]

    def logps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, engine_lp, trainer_lp = rollout_logps(model, tokenizer, engine, prompts, 1.0, seed=seed)
        return engine_lp, trainer_lp.float()

    before, recomputed = logps(seed=9)
    assert (before - recomputed).abs().mean() < 0.02, (before - recomputed).abs().mean()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    for _ in range(2):
        train_step(model, optimizer, prompts[0] + prompts[0])
    after, recomputed = logps(seed=9)
    assert (after - recomputed).abs().mean() < 0.02, (after - recomputed).abs().mean()
    assert (after[: before.numel()] - before).abs().mean() > 0.1  # the copy followed the optimizer steps
    for mine, theirs in zip(copy.parameters(), model.parameters()):
        assert torch.equal(mine, theirs.to(torch.bfloat16))


# ---- the stage ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def say_task(tmp_path_factory) -> tuple[Path, Path]:
    """'say WORD' -> 'WORD': an SFT start that gets it right sometimes, and the RL prompts with their answers."""
    tmp = tmp_path_factory.mktemp("say")
    turns = [
        {"conversations": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in WORDS8
    ]
    sft = write_jsonl(tmp / "sft.jsonl", turns)
    base = train(tmp, "sft", data_path=str(sft), max_steps=100, lr=1e-2, batch_size=8) / "final"
    prompts = [{"messages": [{"role": "user", "content": f"say {w}"}], "answer": w} for w in WORDS8]
    return base, write_jsonl(tmp / "rl.jsonl", prompts)


GRPO_FLAGS = dict(batch_size=4, num_generations=8, max_seq_len=40, max_completion_len=6, warmup_steps=1)


def test_grpo_raises_the_exact_match_reward(tmp_path, say_task):
    base, data = say_task
    run = train(tmp_path, "grpo", init_from=str(base), data_path=str(data), max_steps=60, lr=5e-3, beta=0.0,
                **GRPO_FLAGS)  # fmt: skip
    rewards = [row["reward"] for _, row in sorted(metrics(run).items())]
    first, last = sum(rewards[:15]) / 15, sum(rewards[-15:]) / 15
    assert last > first + 0.1, (first, last)
    row = metrics(run)[60]
    for key in (
        "reward",
        "reward_std",
        "clip_fraction",
        "completion_len",
        "reward/exact_match",
        "rollout_tokens_per_s",
    ):
        assert key in row
    assert (run / "final" / "model.safetensors").is_file()


def test_grpo_with_a_reference_logs_kl_and_token_normalisation(tmp_path, say_task):
    base, data = say_task
    run = train(tmp_path, "grpo", init_from=str(base), data_path=str(data), max_steps=4, lr=5e-3, beta=0.04,
                rl_loss="grpo", loss_norm="token", rewards={"exact_match": 1.0, "length": 0.1}, **GRPO_FLAGS)  # fmt: skip
    rows = metrics(run)
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert rows[4]["kl"] > 0
    assert "reward/length" in rows[4]


def test_sigkill_mid_grpo_then_resume_equals_an_uninterrupted_run(tmp_path, say_task):
    from tests.test_training_align_resume import run_killed_and_resumed

    base, data = say_task
    flags = dict(max_steps=12, save_every=5, keep_last=2, dropout=0.1, lr=5e-3, beta=0.04, grad_accum=2)
    run_killed_and_resumed(tmp_path, "grpo", data, init_from=str(base), **{**GRPO_FLAGS, **flags})


def test_sampler_logprobs_mode_processed_gives_the_sampled_distributions_logprobs():
    from engine.sampling import SamplingTensors, sample
    from engine.sampling_params import SamplingParams

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0.5, seed=1, logprobs=0, logprobs_mode="processed"),
        SamplingParams(temperature=0.5, seed=2, logprobs=0),  # raw: the model's own distribution
        SamplingParams(temperature=0.0, logprobs=0, logprobs_mode="processed"),
    ]
    t = SamplingTensors.from_params(params, 50, sample_indices=[0, 0, 0])
    out = sample(logits, t, torch.zeros(3, dtype=torch.long))
    chosen = out.token_ids.unsqueeze(1)
    assert torch.allclose(out.logprobs[0], (logits[0] / 0.5).log_softmax(-1).gather(0, chosen[0])[0])
    assert torch.allclose(out.logprobs[1], logits[1].log_softmax(-1).gather(0, chosen[1])[0])
    assert torch.allclose(out.logprobs[2], logits[2].log_softmax(-1).max())
    with pytest.raises(Exception, match="logprobs_mode"):
        SamplingParams(logprobs_mode="scaled")
