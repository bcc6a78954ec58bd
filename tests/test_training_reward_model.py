"""The reward_model reward: a local sequence-classification directory scores completions with its own logit;
missing directories, causal LMs and multi-label classifiers are refused with the fix; grpo trains with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_training_support import metrics, tokenizer_dir, train, write_jsonl
from training.errors import TrainingError
from training.rewards import RewardSet, Sample


def tiny_classifier(folder: Path, num_labels: int = 1, causal: bool = False) -> Path:
    """A randomly initialised Llama classifier (or causal LM) with the test tokenizer, saved like any checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config) if causal else LlamaForSequenceClassification(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def samples() -> list[Sample]:
    question = [{"role": "user", "content": "say the model"}]
    texts = ["the model", "text and learns to predict", "token"]
    return [Sample(question, "the model", text, [], "stop", 8) for text in texts]


def test_the_score_is_the_classifiers_logit_for_the_conversation(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_classifier(tmp_path / "rm")
    rewards = RewardSet({"reward_model": 2.0, "exact_match": 1.0}, str(folder))
    totals, parts = rewards.score(samples())
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = []
    for sample in samples():  # one at a time, no padding: the batched scores must not depend on their neighbours
        messages = [*sample.messages, {"role": "assistant", "content": sample.completion}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        with torch.no_grad():
            expected.append(float(model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 0]))
    assert parts["reward_model"] == pytest.approx(expected, abs=1e-5)
    assert len(set(parts["reward_model"])) == 3  # different texts, different scores
    assert totals == pytest.approx([2 * e + m for e, m in zip(expected, [1.0, 0.0, 0.0])], abs=1e-5)


def test_bad_reward_model_directories_are_refused_with_the_fix(tmp_path):
    with pytest.raises(TrainingError, match="reward_model: field is empty"):
        RewardSet({"reward_model": 1.0}, "")
    with pytest.raises(TrainingError, match="no such directory"):
        RewardSet({"reward_model": 1.0}, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no config.json"):
        RewardSet({"reward_model": 1.0}, str(tmp_path / "empty"))
    with pytest.raises(TrainingError, match="LlamaForCausalLM, not a ...ForSequenceClassification"):
        RewardSet({"reward_model": 1.0}, str(tiny_classifier(tmp_path / "lm", causal=True)))
    with pytest.raises(TrainingError, match="2 output labels"):
        RewardSet({"reward_model": 1.0}, str(tiny_classifier(tmp_path / "two", num_labels=2)))
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]


def test_grpo_trains_on_reward_model_scores(tmp_path):
    from tests.test_training_support import TINY_MODEL

    folder = tiny_classifier(tmp_path / "rm")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {w}"} for w in ("the", "model", "text", "and")])
    run = train(tmp_path, "grpo", data_path=str(data), model_config=dict(TINY_MODEL), rewards={"reward_model": 1.0},
                reward_model=str(folder), max_steps=2, num_generations=4, max_seq_len=40, max_completion_len=6,
                beta=0.0)  # fmt: skip
    rows = metrics(run)
    assert rows[2]["reward/reward_model"] != 0.0 and rows[2]["reward_std"] > 0
