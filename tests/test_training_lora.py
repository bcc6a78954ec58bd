"""LoRA: only adapters train, the adapter is PEFT's format (PEFT loads it), and every merge equals base+adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from minimind.cli import main
from tests.test_training_support import conversation, metrics, sentences, train, write_jsonl

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny pretrained base, then a LoRA run on it. The base must be trained a little: with frozen random
    embeddings (std 0.02) the logits cannot move far, whatever the adapters do."""
    tmp = tmp_path_factory.mktemp("lora")
    pretrain = write_jsonl(tmp / "p.jsonl", [{"text": t} for t in sentences(20)])
    base = train(tmp, data_path=str(pretrain), max_steps=40, lr=1e-2) / "final"
    sft = write_jsonl(tmp / "s.jsonl", [conversation(n) for n in range(8)])
    run = train(tmp, "lora", data_path=str(sft), init_from=str(base), max_steps=30, lr=1e-2, max_seq_len=96)
    return base, run


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_trains_only_the_adapters(lora_run):
    base, run = lora_run
    losses = metrics(run)
    assert losses[30]["loss"] < 0.7 * losses[1]["loss"]
    state = torch.load(next((run / "checkpoints").iterdir()) / "trainer_state.pt", weights_only=False)
    base_weights = load_file(str(base / "model.safetensors"))
    base_weights.setdefault("lm_head.weight", base_weights["model.embed_tokens.weight"])  # tied
    for key, value in state["model"].items():  # every base weight is exactly as loaded
        if "lora_" not in key:
            torch.testing.assert_close(value, base_weights[key.replace(".base_layer", "")], rtol=0, atol=0)
    trained = {p for group in state["optimizer"]["param_groups"] for p in group["params"]}
    assert trained and all("lora_" in name for name in trained)


def test_adapter_is_peft_format_on_every_linear_layer(lora_run):
    _, run = lora_run
    adapter = run / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    for layer in (0, 1):
        for name in TARGETS:
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            for part in ("lora_A", "lora_B"):
                assert f"base_model.model.model.layers.{layer}.{block}.{name}.{part}.weight" in keys


def test_peft_loads_the_adapter_and_every_merge_agrees(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  (registers the minimind model type)
    from models.loader import load_model

    base, run = lora_run
    adapter = run / "final"
    ids = torch.tensor([[1, 40, 41, 42, 60, 61, 70, 80, 90]])
    base_model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    plain = logits(base_model, ids)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    with_peft = logits(peft_model, ids)
    assert (with_peft - plain).abs().max() > 0.1  # the adapter changes the model
    merged_by_training, _ = load_model(run / "final-merged")
    torch.testing.assert_close(logits(merged_by_training, ids), with_peft, atol=1e-4, rtol=1e-4)
    out = tmp_path / "merged"
    assert main(["convert", str(base), str(out), "--merge-lora", str(adapter)]) == 0
    merged_by_convert, _ = load_model(out)
    torch.testing.assert_close(logits(merged_by_convert, ids), with_peft, atol=1e-4, rtol=1e-4)
    at_load, _ = load_model(base, lora=adapter)
    torch.testing.assert_close(logits(at_load, ids), with_peft, atol=1e-4, rtol=1e-4)
