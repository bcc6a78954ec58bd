"""minimind convert: every target that can represent a model reloads in plain transformers with the same logits,
round trips are bit-identical, what a target cannot represent is refused, and OUT is never half-written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import models.export
from minimind.cli import main
from models.convert import convert
from models.errors import CheckpointError
from models.export import write_hf_dir
from models.loader import load_model, load_tokenizer
from tests.conftest import tiny_model
from tests.test_loader import IDS, logits, randomize

PLAIN_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "minimind": "MiniMindForCausalLM",
}


def reload(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def assert_same_tensors(a, b) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize(
    "generation, target, expected",
    [
        ("minimind2-dense", "llama", "llama"),
        ("minimind2-dense", "auto", "llama"),
        ("minimind2-dense", "minimind", "minimind"),
        ("minimind3-dense", "qwen3", "qwen3"),
        ("minimind3-dense", "auto", "qwen3"),
        ("minimind3-dense", "minimind", "minimind"),
    ],
)
def test_upstream_pth_to_every_representable_target(upstream_fixtures, tmp_path, generation, target, expected):
    folder = upstream_fixtures / generation
    out, used = convert(folder / "model.pth", tmp_path / "out", target)
    assert used == expected
    model = reload(out)
    assert type(model).__name__ == PLAIN_CLASSES[expected]
    cases = torch.load(folder / "cases.pt")
    assert (logits(model, cases["input_ids"]) - cases["logits"]).abs().max().item() <= 1e-4
    prompt = cases["input_ids"][:, : cases["greedy_prompt_len"]]
    greedy = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy[:, prompt.shape[1] :].tolist() == cases["greedy_continuations"]

    # Round trip: OUT -> OUT2 of the same type leaves every tensor bit-identical.
    out2, _ = convert(out, tmp_path / "out2", expected)
    assert_same_tensors(out, out2)


def test_output_directory_contents(upstream_fixtures, tmp_path):
    out, _ = convert(upstream_fixtures / "minimind3-dense" / "model.pth", tmp_path / "out", "qwen3", dtype="bf16")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1
    assert 2 in generation["eos_token_id"]  # <|im_end|>: converted models stop at the end of a chat turn
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


MOE_CASES = [
    ("qwen3_moe", dict(qk_norm=True, num_experts_per_tok=1, n_shared_experts=0)),
    ("qwen3_moe", dict(qk_norm=True, num_experts_per_tok=2, n_shared_experts=0, tie_word_embeddings=False)),
    ("qwen2_moe", dict(num_experts_per_tok=2, n_shared_experts=1)),
    ("qwen2_moe", dict(num_experts_per_tok=1, n_shared_experts=2, moe_intermediate_size=32)),
    ("qwen2_moe", dict(num_experts_per_tok=2, n_shared_experts=0)),
]


@pytest.mark.parametrize("target, overrides", MOE_CASES)
def test_moe_targets_reload_in_plain_transformers(upstream_fixtures, tmp_path, target, overrides):
    ours = randomize(tiny_model(use_moe=True, n_routed_experts=4, **overrides))
    tokenizer = load_tokenizer(upstream_fixtures / "minimind2-dense")
    src = write_hf_dir(tmp_path / "src", ours.config, ours.state_dict(), tokenizer)
    out, used = convert(src, tmp_path / "out", "auto")
    assert used == target
    model = reload(out)
    assert type(model).__name__ == PLAIN_CLASSES[target]
    assert (logits(model, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4
    # Round trips: back to minimind is bit-identical to the source, and target -> target too.
    back, _ = convert(out, tmp_path / "back", "minimind")
    assert_same_tensors(src, back)
    again, _ = convert(out, tmp_path / "again", target)
    assert_same_tensors(out, again)


def test_qwen2_moe_shared_expert_is_exact(upstream_fixtures, tmp_path):
    """sigmoid(0) * (2 * down) equals our ungated shared expert bit for bit, not just approximately."""
    ours = randomize(tiny_model(use_moe=True, n_routed_experts=4, n_shared_experts=1))
    out = write_hf_dir(
        tmp_path / "out",
        ours.config,
        ours.state_dict(),
        load_tokenizer(upstream_fixtures / "minimind2-dense"),
        target="qwen2_moe",
    )
    theirs = reload(out)
    x = torch.randn(7, 64)
    with torch.no_grad():
        ours_shared = ours.model.layers[0].mlp.shared_experts[0](x)
        block = theirs.model.layers[0].mlp
        theirs_shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    assert torch.equal(ours_shared, theirs_shared)


@pytest.mark.parametrize(
    "overrides, target, message",
    [
        (dict(qk_norm=True), "llama", "q/k RMSNorm"),
        (dict(), "qwen3", "no q/k norm"),
        (dict(use_moe=True), "llama", "MoE"),
        (dict(use_moe=True, qk_norm=True), "qwen3", "MoE"),
        (dict(), "qwen3_moe", "dense"),
        (dict(use_moe=True, qk_norm=True, n_shared_experts=1), "qwen3_moe", "shared experts"),
        (dict(use_moe=True, qk_norm=True), "qwen2_moe", "q/k RMSNorm"),
        (dict(attention_bias=True), "llama", "biases"),
        (dict(head_dim=32), "qwen2_moe", "head_dim"),
    ],
)
def test_targets_refuse_what_they_cannot_represent(upstream_fixtures, tmp_path, overrides, target, message):
    ours = tiny_model(**overrides)
    src = write_hf_dir(
        tmp_path / "src", ours.config, ours.state_dict(), load_tokenizer(upstream_fixtures / "minimind2-dense")
    )
    with pytest.raises(CheckpointError, match=f"cannot convert to {target}: .*{message}"):
        convert(src, tmp_path / "out", target)
    assert not (tmp_path / "out").exists()


def test_auto_falls_back_to_minimind_when_nothing_plain_fits(upstream_fixtures, tmp_path):
    ours = tiny_model(use_moe=True, qk_norm=True, n_shared_experts=1)
    src = write_hf_dir(
        tmp_path / "src", ours.config, ours.state_dict(), load_tokenizer(upstream_fixtures / "minimind2-dense")
    )
    _, used = convert(src, tmp_path / "out", "auto")
    assert used == "minimind"


def test_qwen2_with_qkv_bias_round_trip(upstream_fixtures, tmp_path):
    ours = randomize(tiny_model(attention_bias=True))
    src = write_hf_dir(
        tmp_path / "src", ours.config, ours.state_dict(), load_tokenizer(upstream_fixtures / "minimind2-dense")
    )
    out, used = convert(src, tmp_path / "out", "auto")
    assert used == "qwen2" and type(reload(out)).__name__ == "Qwen2ForCausalLM"
    assert (logits(reload(out), IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4


# ---- OUT handling ----


def test_existing_out_is_refused_and_left_alone(upstream_fixtures, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        convert(upstream_fixtures / "minimind2-dense" / "model.pth", tmp_path / "out", "llama")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(upstream_fixtures / "minimind2-dense" / "model.pth", tmp_path / "out", "llama", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_failure_while_writing_leaves_no_out(upstream_fixtures, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models.export, "generation_config", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(upstream_fixtures / "minimind2-dense" / "model.pth", tmp_path / "out", "llama")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary directory


def test_missing_tokenizer_is_refused_before_writing(tmp_path):
    ours = tiny_model()
    ours.save_pretrained(tmp_path / "src")
    with pytest.raises(CheckpointError, match="--tokenizer DIR"):
        convert(tmp_path / "src", tmp_path / "out", "llama")
    assert not (tmp_path / "out").exists()


# ---- the command line ----


def test_cli_convert_and_errors(upstream_fixtures, tmp_path, capsys):
    pth = str(upstream_fixtures / "minimind2-dense" / "model.pth")
    assert main(["convert", pth, str(tmp_path / "out"), "--to", "llama", "--dtype", "fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["model.norm.weight"].dtype == torch.float16
    assert main(["convert", pth, str(tmp_path / "out"), "--to", "llama"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", pth, str(tmp_path / "q"), "--to", "qwen3"]) == 1
    assert "cannot convert to qwen3" in capsys.readouterr().err
    model, _ = load_model(tmp_path / "out")
    assert model.config.num_hidden_layers == 2


def test_merge_lora_matches_peft_merge(upstream_fixtures, tmp_path):
    """--merge-lora with an adapter saved by PEFT gives PEFT's own merged model, through convert and load_model."""
    from peft import LoraConfig, get_peft_model

    base = randomize(tiny_model())
    tokenizer = load_tokenizer(upstream_fixtures / "minimind2-dense")
    src = write_hf_dir(tmp_path / "src", base.config, base.state_dict(), tokenizer)
    peft_model = get_peft_model(
        randomize(tiny_model()), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits(peft_model.merge_and_unload().eval(), IDS)

    out, _ = convert(src, tmp_path / "out", "llama", merge_lora=tmp_path / "adapter")
    assert (logits(reload(out), IDS) - expected).abs().max().item() <= 1e-4
    merged, _ = load_model(src, lora=tmp_path / "adapter")
    assert (logits(merged, IDS) - expected).abs().max().item() <= 1e-4


def bad_model_files(folder, upstream_fixtures) -> dict[str, list[str]]:
    """Every kind of broken model file, as `minimind convert` arguments (SRC and options)."""
    import pickle

    from tests.test_loader import WritesMarker, edit_config, our_dir

    pth, config = (
        upstream_fixtures / "minimind2-dense" / "model.pth",
        upstream_fixtures / "minimind2-dense" / "config.json",
    )
    cases: dict[str, list[str]] = {}

    def hf_dir(name: str, **changes) -> str:
        our_dir(folder / name, upstream_fixtures)
        edit_config(folder / name, **changes)
        cases[name] = [str(folder / name)]
        return str(folder / name)

    hf_dir("missing-field", hidden_size=None)
    hf_dir("string-field", hidden_size="64")
    hf_dir("negative-field", num_attention_heads=-4)
    hf_dir("million-layers", num_hidden_layers=1000000)
    (folder / hf_dir("bad-json") / "config.json").write_text('{"model_type": "minimind", "hidden_size": ,}')
    weights = folder / hf_dir("truncated-safetensors") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    (folder / hf_dir("garbage-safetensors") / "model.safetensors").write_bytes(b"\xff" * 64)
    (folder / "no-config").mkdir()
    cases["no-config"] = [str(folder / "no-config")]
    files = {
        "truncated.pth": pth.read_bytes()[: pth.stat().st_size // 2],
        "empty.pth": b"",
        "text.pth": b"this is not a checkpoint",
        "plain-pickle-with-code.pth": pickle.dumps({"w": WritesMarker(folder / "payload-ran")}),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    state = torch.load(pth)
    state["model.norm.weight"] = WritesMarker(folder / "payload-ran")
    torch.save(state, folder / "zip-with-code.pth")
    for name in [*files, "zip-with-code.pth"]:
        cases[name] = [str(folder / name), "--config", str(config)]
    return cases


def test_every_bad_model_file_is_one_error_line(upstream_fixtures, tmp_path, capsys):
    """What, where, how: one line on stderr, exit 1, no traceback, and never torch's advice to load
    with weights_only=False."""
    cases = bad_model_files(tmp_path / "bad", upstream_fixtures)
    capsys.readouterr()  # the progress bars of building them
    for name, args in cases.items():
        assert main(["convert", args[0], str(tmp_path / "out"), *args[1:]]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert "weights_only" not in err and "Traceback" not in err, (name, err)
        assert args[0] in err, (name, err)  # names the file or directory
    assert not (tmp_path / "bad" / "payload-ran").exists()
    assert not (tmp_path / "out").exists()
