"""vlm-pretrain / vlm-sft on the shared trainer: what each stage trains, data errors, the saved VLM."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from tests.conftest import UPSTREAM_FIXTURES, tiny_model
from training.config import TrainConfig
from training.errors import TrainingError
from training.stages import get_stage
from training.trainer import Trainer


@pytest.fixture
def vlm_run(tmp_path):
    """A tiny LLM (minimind-3 tokenizer), a tiny SigLIP directory and 4 conversations about 2 images."""
    from models.loader import load_tokenizer

    llm = tmp_path / "llm"
    tiny_model().save_pretrained(llm)
    load_tokenizer(UPSTREAM_FIXTURES / "minimind3-v").save_pretrained(llm)
    encoder = tmp_path / "siglip"
    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    SiglipVisionModel(vision).save_pretrained(encoder)
    data = tmp_path / "data"
    data.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (40, 40), colour).save(data / name)
    rows = [
        {
            "image": "red.png",
            "conversations": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
        },
        {
            "image": "blue.png",
            "conversations": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "blue"}],
        },
        {
            "image": ["red.png", "blue.png"],
            "conversations": [
                {"role": "user", "content": "<image><image> which?"},
                {"role": "assistant", "content": "both"},
            ],
        },
        {"conversations": [{"role": "user", "content": "no picture"}, {"role": "assistant", "content": "ok"}]},
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, llm, encoder, data / "train.jsonl"


def run_config(tmp_path, llm, encoder, data, stage: str, **overrides) -> TrainConfig:
    fields = dict(
        stage=stage,
        init_from=str(llm),
        vision_encoder=str(encoder),
        data_path=str(data),
        max_seq_len=64,
        batch_size=2,
        max_steps=1,
        lr=1e-2,
        warmup_steps=0,
        device="cpu",
        output_dir=str(tmp_path / stage),
        report_to="none",
        save_every=0,
        log_every=1,
    )
    return TrainConfig(**{**fields, **overrides})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("stage", "trained"),
    [("vlm-pretrain", ("vision_proj.",)), ("vlm-sft", ("vision_proj.", "model.", "lm_head."))],
)
def test_each_stage_updates_only_its_weights(vlm_run, stage, trained):
    tmp_path, llm, encoder, data = vlm_run
    trainer = Trainer(run_config(tmp_path, llm, encoder, data, stage), get_stage(stage))
    trainer.setup()  # run() sets up again, identically (seeded): these are the weights it starts from
    before = snapshot(trainer.model)
    final = trainer.run()
    after = snapshot(trainer.model)
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        if key.startswith("vision_encoder.") or not key.startswith(trained):
            assert not changed, f"{stage} changed frozen {key}"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vision_proj."))
    if stage == "vlm-sft":
        assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    from models.loader import load_model

    saved, _ = load_model(final)
    assert torch.equal(saved.vision_proj.mlp[1].weight, after["vision_proj.mlp.1.weight"])


def test_each_position_is_trained_on_the_next_token(vlm_run):
    """input_ids and targets are shifted by one (the loss takes them as they are): the answer is predicted from
    the tokens before it, and the image runs the model reads are complete."""
    from training.data import IGNORE

    tmp_path, llm, encoder, data = vlm_run
    trainer = Trainer(run_config(tmp_path, llm, encoder, data, "vlm-sft"), get_stage("vlm-sft"))
    trainer.setup()
    item = trainer.dataset[0]
    inputs, targets = item["input_ids"], item["targets"]
    assert inputs.shape == targets.shape
    trained = targets[:-1] != IGNORE
    assert trained.any() and torch.equal(targets[:-1][trained], inputs[1:][trained])
    answer = trainer.tokenizer.decode(targets[targets != IGNORE])
    assert "red" in answer and answer.endswith("<|im_end|>\n")
    image_id = trainer.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs == image_id).sum()) == trainer.model.config.image_token_len * len(item["pixel_values"])


TINY_SIGLIP = dict(
    model_type="siglip_vision_model",
    image_size=32,
    patch_size=16,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vision_use_head=False,  # the pooling head is not used (the VLM projects every patch)
)


def test_a_fresh_encoder_from_vision_config_is_trained(vlm_run):
    """vision_config + train_vision_encoder: a random encoder of that shape, trained with the projector (the
    offline demo's recipe); vlm-pretrain still leaves the LLM alone."""
    tmp_path, llm, encoder, data = vlm_run
    config = run_config(
        tmp_path, llm, "", data, "vlm-pretrain", vision_config=TINY_SIGLIP, train_vision_encoder=True, lr=1e-3
    )
    trainer = Trainer(config, get_stage("vlm-pretrain"))
    trainer.setup()
    before = snapshot(trainer.model)
    final = trainer.run()
    after = snapshot(trainer.model)
    encoder_keys = [k for k in before if k.startswith("vision_encoder.") and "weight" in k]
    assert encoder_keys and all(not torch.equal(before[k], after[k]) for k in encoder_keys)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("model.", "lm_head.")))
    from models.loader import load_model

    saved, _ = load_model(final)
    assert saved.config.vision_config.hidden_size == 32 and saved.config.image_token_len == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vision_config": TINY_SIGLIP, "train_vision_encoder": True}, "give one"),
        ({"vision_config": TINY_SIGLIP, "vision_encoder": ""}, "set train_vision_encoder: true"),
        (
            {"vision_config": {**TINY_SIGLIP, "model_type": "vit"}, "vision_encoder": "", "train_vision_encoder": True},
            "vision_config: vision_config.model_type 'vit' is not supported",
        ),
    ],
)
def test_vision_config_mistakes_are_named(vlm_run, fields, message):
    tmp_path, llm, encoder, data = vlm_run
    with pytest.raises(TrainingError, match=message):
        Trainer(run_config(tmp_path, llm, encoder, data, "vlm-sft", **fields), get_stage("vlm-sft")).setup()


def test_vlm_sft_with_lora_trains_adapters_and_the_projector_only(vlm_run):
    """use_lora: training/lora.py's adapters on the LLM's linear layers (none on the encoder's), the projector
    in full; final/ is the merged VLM, final-lora/ the PEFT adapter."""
    from models.loader import load_model
    from training.lora import LoRALinear

    tmp_path, llm, encoder, data = vlm_run
    config = run_config(tmp_path, llm, encoder, data, "vlm-sft", use_lora=True, max_steps=2, lr=1e-2)
    trainer = Trainer(config, get_stage("vlm-sft"))
    trainer.setup()
    wrapped = [name for name, m in trainer.model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(name.startswith("model.") for name in wrapped)
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or name.startswith("vision_proj.") for name in trained)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    final = trainer.run()
    assert (final.parent / "final-lora" / "adapter_model.safetensors").is_file()
    saved, _ = load_model(final)
    base_key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved.state_dict()[base_key], before["model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert torch.equal(
        saved.vision_encoder.state_dict()["post_layernorm.weight"], before["vision_encoder.post_layernorm.weight"]
    )


def test_marker_count_must_match_the_images(vlm_run):
    tmp_path, llm, encoder, data = vlm_run
    bad = tmp_path / "bad.jsonl"
    row = {
        "image": ["red.png"],
        "conversations": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}],
    }
    bad.write_text(json.dumps(row) + "\n")
    trainer = Trainer(
        run_config(tmp_path, llm, encoder, bad, "vlm-pretrain", image_dir=str(data.parent)), get_stage("vlm-pretrain")
    )
    with pytest.raises(TrainingError, match="bad.jsonl:1: 2 <image> markers but 1 images"):
        trainer.setup()


def test_missing_image_and_missing_encoder_are_named(vlm_run):
    tmp_path, llm, encoder, data = vlm_run
    with pytest.raises(TrainingError, match="image file not found"):
        Trainer(
            run_config(tmp_path, llm, encoder, data, "vlm-pretrain", image_dir=str(tmp_path)), get_stage("vlm-pretrain")
        ).setup()
    with pytest.raises(TrainingError, match="needs a vision encoder"):
        Trainer(
            run_config(tmp_path, llm, encoder, data, "vlm-pretrain", vision_encoder=""), get_stage("vlm-pretrain")
        ).setup()


def test_resume_from_a_checkpoint_is_exact(vlm_run):
    """A run resumed from its step-2 checkpoint (copied into a fresh run directory) ends with the same weights
    as the run that went straight through: data order, RNG, optimizer and projector state all restored."""
    import shutil

    from safetensors.torch import load_file

    tmp_path, llm, encoder, data = vlm_run
    flags = dict(max_steps=4, save_every=2, keep_last=3, lr=1e-3)
    whole = Trainer(run_config(tmp_path, llm, encoder, data, "vlm-sft", **flags), get_stage("vlm-sft")).run()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        tmp_path / "vlm-sft" / "checkpoints" / "step-00000002", resumed_dir / "checkpoints" / "step-00000002"
    )
    config = run_config(tmp_path, llm, encoder, data, "vlm-sft", output_dir=str(resumed_dir), **flags)
    trainer = Trainer(config, get_stage("vlm-sft"))
    resumed = trainer.run()
    assert trainer.start_step == 2  # it did resume (a fresh run would also end equal)
    left, right = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_vlm_demo_data_is_readable_by_the_stage(tmp_path, vlm_run):
    """`minimind data vlm-demo` writes pictures whose answers can be read off them, in the stage's format."""
    from PIL import Image as PILImage

    from minimind.cli import main

    _, llm, encoder, _ = vlm_run
    out = tmp_path / "shapes"
    assert main(["data", "vlm-demo", str(out), "--count", "20"]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 18 * 3 and len((out / "test.jsonl").read_text().splitlines()) == 2 * 3
    colour_row = next(r for r in rows if "colour" in r["conversations"][0]["content"])
    picture = PILImage.open(out / colour_row["image"]).convert("RGB")
    from training.vlm_demo_data import COLOURS

    expected = COLOURS[colour_row["conversations"][1]["content"]]
    assert expected in {colour for _, colour in picture.getcolors(4096)}
    trainer = Trainer(
        run_config(tmp_path, llm, encoder, out / "train.jsonl", "vlm-pretrain"), get_stage("vlm-pretrain")
    )
    trainer.setup()
    assert len(trainer.dataset) == 54 and trainer.dataset[0]["pixel_values"].shape == (1, 3, 32, 32)
