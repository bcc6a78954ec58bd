"""The trainer loop on CPU: losses fall, accumulation is exact, final weights load where they must, configs work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from minimind.cli import main
from tests.test_training_support import (
    ROOT,
    TINY_MODEL,
    config_values,
    conversation,
    metrics,
    sentences,
    tokenizer_dir,
    train,
    write_jsonl,
)
from training.config import FIELDS, load_config
from training.errors import TrainingError


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pretrain.jsonl", [{"text": t} for t in sentences(12)])


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", [conversation(n) for n in range(8)])


def test_pretrain_loss_falls_on_a_memorisation_task(tmp_path, pretrain_data):
    run = train(tmp_path, data_path=str(pretrain_data), max_steps=60, lr=1e-2)
    losses = metrics(run)
    first, last = losses[1]["loss"], losses[60]["loss"]
    assert first > 5.0  # about ln(320) for a fresh model
    assert last < 0.3 * first, (first, last)
    assert (run / "final" / "model.safetensors").is_file()


def test_sft_loss_falls_on_a_memorisation_task(tmp_path, sft_data):
    run = train(tmp_path, "sft", data_path=str(sft_data), max_steps=60, lr=1e-2, max_seq_len=96)
    losses = metrics(run)
    first, last = losses[1]["loss"], losses[60]["loss"]
    assert first > 4.0
    assert last < 0.2 * first, (first, last)


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_gradient_accumulation_equals_the_large_batch(tmp_path, sft_data):
    """Batch 8 x 1 and batch 2 x 4 see the same 8 conversations per step (of different lengths, padded
    differently) and give the same losses and weights: every trained token weighs the same."""
    common = dict(data_path=str(sft_data), max_steps=3, max_seq_len=96, lr=1e-2, seed=3)
    big = train(tmp_path / "big", "sft", batch_size=8, grad_accum=1, **common)
    small = train(tmp_path / "small", "sft", batch_size=2, grad_accum=4, **common)
    for step in (1, 2, 3):
        assert metrics(small)[step]["loss"] == pytest.approx(metrics(big)[step]["loss"], abs=1e-5)
    a, b = final_state(big), final_state(small)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    assert metrics(big)[3]["loss"] < metrics(big)[1]["loss"] - 0.1  # the steps really trained


def test_final_hf_directory_loads_in_engine_and_transformers(tmp_path, pretrain_data):
    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  (registers the minimind model type with transformers)
    from models.loader import load_model

    run = train(tmp_path, data_path=str(pretrain_data), max_steps=2)
    final = run / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == 2
    model, tokenizer = load_model(final)
    assert tokenizer.chat_template and len(tokenizer) == 320
    hf = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    ids = torch.tensor([tokenizer("the model reads text")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits)
    # the weights are the trained ones: equal to the last checkpoint's model state
    saved = torch.load(next((run / "checkpoints").iterdir()) / "trainer_state.pt", weights_only=False)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key].float(), msg=key)
    assert (run / "config.yaml").is_file() and yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2


def test_save_format_pth_writes_the_upstream_layout(tmp_path, upstream_fixtures):
    """--save-format pth: a flat fp16 state dict with upstream's keys (lm_head included), loadable as upstream's."""
    from models.loader import load_model

    fixture = upstream_fixtures / "minimind2-dense"
    upstream = torch.load(fixture / "model.pth", map_location="cpu", weights_only=True)
    shape = json.loads((fixture / "config.json").read_text())
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in sentences(20)])
    model_config = {k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    model_config |= {"num_key_value_heads": 2, "intermediate_size": shape["intermediate_size"]}
    run = train(
        tmp_path,
        data_path=str(data),
        tokenizer=str(fixture),
        model_config=model_config,
        max_steps=1,
        save_format="both",
    )
    state = torch.load(run / "final" / "pretrain_64.pth", map_location="cpu", weights_only=True)
    assert set(state) == set(upstream)
    for key, value in upstream.items():
        assert state[key].shape == value.shape, key
        assert state[key].dtype == torch.float16
    model, _ = load_model(run / "final" / "pretrain_64.pth", config=fixture / "config.json", tokenizer=fixture)
    reference, _ = load_model(run / "final")
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-2, rtol=0)  # fp16 storage


def test_configs_directory_presets_all_load():
    from models.presets import PRESETS

    files = sorted((ROOT / "configs").glob("*.yaml"))
    names = {f.stem for f in files}
    for model in ("demo", "minimind2-small", "minimind2", "minimind3"):
        for stage in ("pretrain", "sft", "lora"):
            assert f"{stage}-{model}" in names, f"configs/{stage}-{model}.yaml missing"
    for path in files:
        raw = yaml.safe_load(path.read_text())
        cfg = load_config(path)
        assert cfg.stage.split("-")[0] == path.stem.split("-")[0], path  # e.g. sft-demo.yaml, vlm-demo.yaml (vlm-sft)
        assert cfg.preset in PRESETS, path
        assert set(raw) <= set(FIELDS)


def test_flags_override_the_yaml_and_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\nlr: 1e-4\nbatch_size: 8\nlora_targets: [q_proj]\n")
    cfg = load_config(path, {"batch_size": "16", "lora_targets": "q_proj,v_proj", "compile": "true"})
    assert (cfg.stage, cfg.lr, cfg.batch_size, cfg.lora_targets, cfg.compile) == (
        "sft",
        1e-4,
        16,
        ["q_proj", "v_proj"],
        True,
    )
    with pytest.raises(TrainingError, match="unknown config field.*batchsize"):
        load_config(path, {"batchsize": 3})
    with pytest.raises(TrainingError, match="config field batch_size: cannot read 'x' as int"):
        load_config(path, {"batch_size": "x"})
    with pytest.raises(TrainingError, match="config field init_from='' must name the model LoRA adapts"):
        load_config(path, stage="lora")
    with pytest.raises(TrainingError, match="config file .*missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")


def test_minimind_train_runs_a_config_file_from_the_checkout(tmp_path, pretrain_data, monkeypatch, capsys):
    """`minimind train --config configs/pretrain-demo.yaml` (stage taken from the file), flags on top."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    args = ["train", "--config", "configs/pretrain-demo.yaml", "--data-path", str(pretrain_data)]
    args += ["--tokenizer", str(tokenizer_dir()), "--model-config", json.dumps(TINY_MODEL), "--max-seq-len", "32"]
    args += ["--batch-size", "2", "--max-steps", "2", "--output-dir", str(out), "--cache-dir", str(tmp_path / "c")]
    args += ["--report-to", "none", "--device", "cpu"]
    assert main(args) == 0
    assert f"final model: {out / 'final'}" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stage"] == "pretrain" and saved["max_steps"] == 2 and saved["batch_size"] == 2
    assert main(["train", "--data-path", str(pretrain_data)]) == 1
    assert "name the stage" in capsys.readouterr().err


def test_trainer_refuses_bad_setups(tmp_path, pretrain_data):
    with pytest.raises(TrainingError, match="data file .*nothing.jsonl not found"):
        train(tmp_path, data_path=str(tmp_path / "nothing.jsonl"))
    with pytest.raises(TrainingError, match="less than one sequence"):
        train(tmp_path, data_path=str(write_jsonl(tmp_path / "short.jsonl", [{"text": "hi"}])))
    with pytest.raises(TrainingError, match="dtype=bf16 needs a GPU"):
        train(tmp_path, data_path=str(pretrain_data), dtype="bf16")
    values = config_values(tmp_path, data_path=str(pretrain_data), tokenizer="")
    with pytest.raises(TrainingError, match="no tokenizer"):
        from training.config import TrainConfig
        from training.stages import get_stage
        from training.trainer import Trainer

        Trainer(TrainConfig(**values), get_stage("pretrain")).run()
