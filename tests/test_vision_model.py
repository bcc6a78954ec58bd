"""MiniMind-V: upstream minimind-v parity (with and without an image), conversion to one HF directory and back,
and the clear errors around vision checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from minimind.cli import main
from models.errors import CheckpointError
from models.loader import load_model
from models.vision import MiniMindVLMForCausalLM
from models.vision.image import ImageError, ImagePreprocessor, open_image


@pytest.fixture
def vlm_fixture(upstream_fixtures):
    return upstream_fixtures / "minimind3-v"


def both_logits(model, cases):
    with torch.no_grad():
        with_image = model(cases["input_ids"], pixel_values=cases["pixel_values"]).logits
        without_image = model(cases["input_ids"]).logits
    return with_image, without_image


def assert_upstream_logits(model, cases):
    with_image, without_image = both_logits(model, cases)
    assert (with_image - cases["logits"]).abs().max() <= 1e-4
    assert (without_image - cases["logits_without_image"]).abs().max() <= 1e-4
    assert (cases["logits"] - cases["logits_without_image"]).abs().max() > 1e-2  # the image matters


def test_upstream_pth_with_encoder_beside_it(vlm_fixture):
    model, tokenizer = load_model(vlm_fixture / "model.pth")
    assert isinstance(model, MiniMindVLMForCausalLM)
    assert tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<|image_pad|>"
    assert_upstream_logits(model, torch.load(vlm_fixture / "cases.pt"))


def test_convert_cli_and_reload_round_trip(vlm_fixture, tmp_path, capsys):
    source = tmp_path / "ckpt"
    source.mkdir()
    shutil.copy(vlm_fixture / "model.pth", source / "model.pth")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(vlm_fixture / name, source / name)
    out = tmp_path / "hf"
    argv = ["convert", str(source / "model.pth"), str(out), "--config", str(vlm_fixture / "config.json")]
    main([*argv, "--vision-encoder", str(vlm_fixture / "vision_encoder")])
    assert "minimind_vlm" in capsys.readouterr().out
    assert (out / "preprocessor_config.json").is_file()
    cases = torch.load(vlm_fixture / "cases.pt")
    for auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText):
        assert_upstream_logits(auto_class.from_pretrained(out).eval(), cases)
    reloaded, _ = load_model(out)
    assert_upstream_logits(reloaded, cases)


def test_vlm_pth_without_encoder_is_refused(vlm_fixture, tmp_path):
    shutil.copy(vlm_fixture / "model.pth", tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="no vision encoder.*--vision-encoder"):
        load_model(tmp_path / "model.pth", config=vlm_fixture / "config.json", tokenizer=vlm_fixture)


def test_vlm_cannot_become_a_plain_llm(vlm_fixture, tmp_path, capsys):
    assert main(["convert", str(vlm_fixture / "model.pth"), str(tmp_path / "out"), "--to", "qwen3"]) != 0
    assert "only our own type is written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_placeholder_count_must_match_the_images(vlm_fixture):
    model, _ = load_model(vlm_fixture / "model.pth")
    cases = torch.load(vlm_fixture / "cases.pt")
    with pytest.raises(ValueError, match="64 <\\|image_pad\\|> tokens but the images give 128"):
        model(cases["input_ids"], pixel_values=cases["pixel_values"].repeat(1, 2, 1, 1, 1))


def test_two_images_fill_their_runs_in_order(vlm_fixture):
    model, _ = load_model(vlm_fixture / "model.pth")
    cases = torch.load(vlm_fixture / "cases.pt")
    ids, pixels = cases["input_ids"], cases["pixel_values"]
    two_ids = torch.cat([ids, ids], dim=1)
    other = -pixels
    with torch.no_grad():
        both = model(two_ids, pixel_values=torch.cat([pixels, other], dim=1)).logits
        swapped = model(two_ids, pixel_values=torch.cat([other, pixels], dim=1)).logits
    # the first half sees only the first image: the upstream logits when that image is the fixture's
    assert (both[:, : ids.shape[1]] - cases["logits"]).abs().max() <= 1e-4
    assert (swapped[:, : ids.shape[1]] - cases["logits"]).abs().max() > 1e-2


def test_preprocessing_matches_siglip_normalisation(vlm_fixture):
    model, _ = load_model(vlm_fixture / "model.pth")
    processor = ImagePreprocessor.for_encoder(model.config.vision_config)
    pixels = processor(Image.new("RGB", (40, 30), (255, 0, 128)))
    assert pixels.shape == (3, 256, 256)
    expected = torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1])
    assert torch.allclose(pixels[:, 100, 100], expected, atol=1e-6)


def test_non_image_bytes_are_refused():
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"%PDF-1.4 not an image")


def test_generate_splices_the_image_on_the_first_step_only(vlm_fixture):
    model, _ = load_model(vlm_fixture / "model.pth")
    cases = torch.load(vlm_fixture / "cases.pt")
    ids = cases["input_ids"]
    with_image = model.generate(ids, pixel_values=cases["pixel_values"][0], max_new_tokens=3, do_sample=False)
    without_image = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert with_image[0, ids.shape[1]] == cases["logits"][0, -1].argmax()
    assert without_image[0, ids.shape[1]] == cases["logits_without_image"][0, -1].argmax()
