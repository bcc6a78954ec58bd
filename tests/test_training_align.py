"""DPO, distillation and reasoning stages: losses, rewards and gradients equal TRL's and direct PyTorch
formulations; the stages move what they should (margin, accuracy, KL); think-tag weights sit on the tags."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tests.test_training_support import TINY_MODEL, conversation, metrics, sentences, tokenizer_dir, train, write_jsonl
from training.errors import TrainingError
from training.losses import dpo_loss, kd_token_kl

PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"say {word}"}],
        "chosen": [{"role": "assistant", "content": f"{word} {word}"}],
        "rejected": [{"role": "assistant", "content": "model tokens" if n % 2 else "it"}],
    }
    for n, word in enumerate(["the", "model", "reads", "text", "and", "learns", "to", "predict"])
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny model pretrained a little (its final/ directory): the start point and the teacher."""
    tmp = tmp_path_factory.mktemp("base")
    data = write_jsonl(tmp / "p.jsonl", [{"text": t} for t in sentences(20)])
    return train(tmp, data_path=str(data), max_steps=20, lr=1e-2) / "final"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "dpo.jsonl", PAIRS)


def load_pair(folder: Path, seed: int):
    """(policy, reference) as transformers models: the reference is the checkpoint, the policy a perturbed copy
    (so that rewards are not all zero)."""
    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  (registers the minimind model type)

    reference = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    policy = AutoModelForCausalLM.from_pretrained(str(folder))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy.train(), reference


def trl_trainer(policy, reference, tmp: Path, rows: list, **args):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, **args,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    return DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def our_batch(rows: list, tmp: Path):
    from training.data_preference import PreferenceDataset, preference_collate

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    dataset = PreferenceDataset([write_jsonl(tmp / "rows.jsonl", rows)], tokenizer, 256, cache_dir=str(tmp / "c"))
    return preference_collate([dataset[i] for i in range(len(dataset))], tokenizer.pad_token_id)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_rewards_and_gradients_equal_trl(tmp_path, base, loss_type):
    """The same model, batch and beta through TRL's DPOTrainer (its tokenization, concatenated forward and loss)
    and through our dpo stage: identical token ids and masks; loss, rewards, accuracy and gradients within 1e-5."""
    from training.config import TrainConfig
    from training.dpo import DPOStage, frozen

    rows = PAIRS[:4]
    policy, reference = load_pair(base, seed=1)
    ours = copy.deepcopy(policy)
    trainer = trl_trainer(policy, reference, tmp_path, rows, beta=0.2, loss_type=[loss_type])
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    batch = our_batch(rows, tmp_path)

    n = len(rows)
    for row in range(2 * n):  # TRL's rows are [chosen..., rejected...], as ours
        keep = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][keep]
        trained = inputs["completion_mask"][row][keep].bool()
        length = len(ids) - 1
        assert batch["input_ids"][row][:length].tolist() == ids[:-1].tolist()
        assert batch["targets"][row][:length].tolist() == torch.where(trained[1:], ids[1:], -100).tolist()
        assert (batch["targets"][row][length:] == -100).all()

    trl_loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    trl_loss.backward()
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}

    stage = DPOStage()
    stage.cfg = TrainConfig(stage="dpo", beta=0.2, dpo_loss=loss_type, device="cpu")
    stage.policy, stage.reference, stage.cached = ours, frozen(copy.deepcopy(reference)), None
    out = stage.loss(ours, batch)
    count = stage.count(batch)
    (out.loss_sum / count).backward()

    assert float(out.loss_sum.detach()) / count == pytest.approx(float(trl_loss), abs=1e-5)
    assert float(out.metrics["reward_margin"]) / count == pytest.approx(logged["rewards/margins"], abs=1e-5)
    assert float(out.metrics["reward_chosen"]) / count == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert float(out.metrics["reward_rejected"]) / count == pytest.approx(logged["rewards/rejected"], abs=1e-5)
    assert float(out.metrics["reward_accuracy"]) / count == pytest.approx(logged["rewards/accuracies"], abs=1e-6)
    assert float(out.metrics["logps_chosen"]) / count == pytest.approx(logged["logps/chosen"], abs=1e-4)
    assert abs(logged["rewards/margins"]) > 1e-3  # the comparison is not between zeros
    trl_grads = dict(policy.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cdpo_and_ipo_follow_their_formulas():
    """cDPO (TRL 1.x no longer has it: its label smoothing belongs to rDPO) against the formula of Mitchell's
    note: -(1 - e) log sigmoid(b d) - e log sigmoid(-b d); IPO against (d_per_token - 1 / 2b)^2."""
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=generator) * 3 for _ in range(4))
    delta = (pc - rc) - (pr - rr)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)
    expected = -0.8 * F.logsigmoid(0.3 * delta) - 0.2 * F.logsigmoid(-0.3 * delta)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(chosen - rejected, 0.3 * delta)
    lc, lr = torch.tensor([3, 4, 5, 6, 7, 8]), torch.tensor([2, 2, 9, 1, 4, 4])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(ipo, ((pc - rc) / lc - (pr - rr) / lr - 1 / 0.6) ** 2)


def test_trl_dpo_trainer_trains_an_exported_checkpoint(tmp_path, base):
    """Interoperability: a final/ directory of ours is a model TRL's DPOTrainer trains."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(str(base))
    reference = AutoModelForCausalLM.from_pretrained(str(base))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = trl_trainer(policy, reference, tmp_path, PAIRS[:4], max_steps=3, learning_rate=1e-3)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_dpo_raises_the_margin_and_the_reward_accuracy(tmp_path, base, pairs):
    run = train(tmp_path, "dpo", data_path=str(pairs), init_from=str(base), max_steps=20, lr=1e-2, max_seq_len=64,
                save_format="both")  # fmt: skip
    logged = metrics(run)
    assert logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert logged[1]["reward_margin"] == 0 and logged[1]["reward_accuracy"] == 0
    assert logged[20]["reward_margin"] > 1.0, logged[20]
    assert logged[20]["reward_accuracy"] == 1.0
    assert logged[20]["loss"] < 0.4
    assert (run / "final" / "rlhf_32.pth").is_file() and (run / "final" / "model.safetensors").is_file()


def test_lora_dpo_uses_the_base_with_adapters_off_as_reference(tmp_path, base, pairs):
    from safetensors.torch import load_file

    run = train(tmp_path, "dpo", data_path=str(pairs), init_from=str(base), max_steps=20, lr=3e-2, max_seq_len=64,
                use_lora=True)  # fmt: skip
    logged = metrics(run)
    assert logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # lora_B = 0: policy == base
    assert logged[20]["reward_margin"] > 0.1 and logged[20]["loss"] < 0.65, logged[20]  # adapters learn it
    assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "final-merged").is_dir()
    state = torch.load(next((run / "checkpoints").iterdir()) / "trainer_state.pt", weights_only=False)
    base_weights = load_file(str(base / "model.safetensors"))
    for key, value in state["model"].items():  # the base (the reference) never moved
        if "lora_" not in key and key in base_weights:
            torch.testing.assert_close(value, base_weights[key.replace(".base_layer", "")], rtol=0, atol=0)


def test_precomputed_reference_log_probs_give_the_same_run(tmp_path, base, pairs):
    common = dict(data_path=str(pairs), init_from=str(base), max_steps=4, lr=3e-3, max_seq_len=64)
    live = metrics(train(tmp_path, "dpo", output_dir=str(tmp_path / "live"), **common))
    cached = metrics(train(tmp_path, "dpo", output_dir=str(tmp_path / "cached"), precompute_ref_logps=True, **common))
    for step in (1, 2, 3, 4):
        assert cached[step]["loss"] == pytest.approx(live[step]["loss"], abs=1e-6)
        assert cached[step]["reward_margin"] == pytest.approx(live[step]["reward_margin"], abs=1e-6)


def test_upstream_and_flat_preference_lines_tokenize_alike(tmp_path):
    upstream = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in PAIRS[:3]]
    flat = [
        {
            "prompt": r["prompt"][0]["content"],
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
        }
        for r in PAIRS[:3]
    ]
    a, b = our_batch(upstream, tmp_path / "a"), our_batch(flat, tmp_path / "b")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    with pytest.raises(TrainingError, match=r'rows.jsonl:1: "chosen" is a string, so the line needs a "prompt"'):
        our_batch([{"chosen": "a", "rejected": "b"}], tmp_path / "c")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_loss_equals_a_direct_pytorch_formulation(direction):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 40, generator=generator), torch.randn(2, 5, 40, generator=generator) * 2
    t = 1.7
    log_s, log_t = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
    if direction == "forward":  # F.kl_div(input=log q, target=p) = KL(p || q)
        expected = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    else:
        expected = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd_token_kl(student, teacher, t, direction), expected)


def test_distill_stage_loss_is_alpha_ce_plus_t2_kl_over_trained_tokens(tmp_path, base):
    """The stage's loss against upstream's formulation: mean CE + T^2 x KL(batchmean over the trained tokens)."""
    from training.config import TrainConfig
    from training.data import SFTDataset, pad_collate
    from training.distill import DistillStage
    from training.stages import StageContext

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    student = load_pair(base, seed=2)[0]
    cfg = TrainConfig(stage="distill", teacher=str(base), distill_alpha=0.3, temperature=2.0, device="cpu")
    stage = DistillStage()
    stage.setup(StageContext(student, cfg, tokenizer, torch.device("cpu"), None, None))
    data = write_jsonl(tmp_path / "s.jsonl", [conversation(n) for n in range(3)])
    dataset = SFTDataset([data], tokenizer, 64, cache_dir=str(tmp_path / "c"))
    batch = pad_collate([dataset[i] for i in range(3)], tokenizer.pad_token_id)
    out = stage.loss(student, batch)
    loss = out.loss_sum / stage.count(batch)

    logits = student(batch["input_ids"]).logits
    with torch.no_grad():
        teacher_logits = stage.teacher(batch["input_ids"]).logits
    mask = batch["targets"] != -100
    ce = F.cross_entropy(logits[mask], batch["targets"][mask])
    kl = F.kl_div(F.log_softmax(logits[mask] / 2, -1), F.softmax(teacher_logits[mask] / 2, -1), reduction="batchmean")
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * 4 * kl)


def test_distillation_lowers_the_kl_to_the_teacher(tmp_path, base):
    data = write_jsonl(tmp_path / "s.jsonl", [conversation(n) for n in range(8)])
    run = train(tmp_path, "distill", data_path=str(data), teacher=str(base), distill_alpha=0.0, temperature=1.0,
                max_steps=30, lr=1e-2, max_seq_len=64, save_format="pth")  # fmt: skip
    logged = metrics(run)
    assert logged[30]["kl"] < 0.5 * logged[1]["kl"], (logged[1], logged[30])
    assert logged[1]["loss"] == pytest.approx(logged[1]["kl"], rel=1e-6)  # alpha 0, T 1: the loss is the KL
    assert (run / "final" / "full_dist_32.pth").is_file()


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    from models.config import MiniMindConfig
    from models.model import MiniMindForCausalLM

    other = tmp_path / "teacher"
    MiniMindForCausalLM(MiniMindConfig(vocab_size=400, **TINY_MODEL)).save_pretrained(str(other))
    data = write_jsonl(tmp_path / "s.jsonl", [conversation(n) for n in range(2)])
    with pytest.raises(TrainingError, match="teacher .* has a vocabulary of 400 tokens, the student 320"):
        train(tmp_path, "distill", data_path=str(data), teacher=str(other), max_seq_len=64)


def tag_weight_template(which: str):
    """(tokenizer, conversation) for the three templates: ours and minimind-3's render reasoning_content; a
    plain ChatML template (no reasoning support) trains inline <think> text."""
    reasoning = [
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "four", "reasoning_content": "add them"},
        {"role": "user", "content": "and three?"},
        {"role": "assistant", "content": "<think>\nadd one\n</think>\nfive"},
    ]
    if which == "minimind3":
        from tests.conftest import UPSTREAM_FIXTURES

        return AutoTokenizer.from_pretrained(str(UPSTREAM_FIXTURES / "minimind3-dense")), reasoning
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    if which == "plain":
        tokenizer.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        reasoning = [dict(m, content=f"<think>add</think>{m['content']}") if m["role"] == "assistant" else m
                     for m in reasoning[:2]] + reasoning[2:]  # fmt: skip
    return tokenizer, reasoning


@pytest.mark.parametrize("which", ["ours", "minimind3", "plain"])
def test_think_tag_weights_sit_exactly_on_the_tag_tokens(which):
    from training.chat_masks import normalise_messages, tokenize_conversation
    from training.reason import ReasonStage, tag_token_ids
    from training.stages import StageContext

    tokenizer, turns = tag_weight_template(which)
    tags = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    assert set(tag_token_ids(tokenizer)) == tags  # single tokens; neither tokenizer has <answer>
    messages, tools = normalise_messages(turns)
    ids, trained = tokenize_conversation(tokenizer, messages, tools)
    targets = torch.tensor([t if m else -100 for t, m in zip(ids, trained)])[1:]
    stage = ReasonStage()
    cfg_stub = type("Cfg", (), {"think_tag_weight": 10.0})()
    stage.setup(StageContext(None, cfg_stub, tokenizer, torch.device("cpu"), None, None))
    weights = stage.token_weights(targets)
    weighted = []
    for position, (target, weight) in enumerate(zip(targets.tolist(), weights.tolist())):
        if target == -100:
            assert weight == 0, position
        elif target in tags:
            assert weight == 10, (position, tokenizer.decode([target]))
            weighted.append(tokenizer.decode([target]))
        else:
            assert weight == 1, (position, tokenizer.decode([target]))
    assert "</think>" in weighted  # every template trains at least the closing tag
    assert weighted.count("</think>") == 2  # both assistant turns close their reasoning


def test_reason_stage_refuses_a_tokenizer_without_think_tokens(upstream_fixtures):
    from training.reason import tag_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense"))
    with pytest.raises(TrainingError, match="no single token for <think>"):
        tag_token_ids(tokenizer)


def test_reason_stage_trains_and_saves_upstream_names(tmp_path, base):
    data = write_jsonl(tmp_path / "r.jsonl", [{"conversations": tag_weight_template("ours")[1]}] * 4)
    plain = train(tmp_path, "reason", data_path=str(data), init_from=str(base), max_steps=2, max_seq_len=64,
                  think_tag_weight=1.0, output_dir=str(tmp_path / "one"))  # fmt: skip
    sft = train(tmp_path, "sft", data_path=str(data), init_from=str(base), max_steps=2, max_seq_len=64)
    assert metrics(plain)[1]["loss"] == pytest.approx(metrics(sft)[1]["loss"], abs=1e-6)  # weight 1 = SFT
    run = train(tmp_path, "reason", data_path=str(data), init_from=str(base), max_steps=2, max_seq_len=64,
                save_format="pth")  # fmt: skip
    assert metrics(run)[1]["loss"] > metrics(plain)[1]["loss"]  # the tags weigh more
    assert (run / "final" / "reason_32.pth").is_file()
