"""Images over the OpenAI API: a live `minimind serve` with a tiny random MiniMind-V, the real OpenAI SDK."""

from __future__ import annotations

import base64
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from tests.conftest import UPSTREAM_FIXTURES, tiny_config
from tests.test_server_support import MODEL_NAME, needs_own_server, start_server

IMAGE_TOKEN_LEN = 4  # a 32x32 SigLIP with 16x16 patches
_tmp = tempfile.TemporaryDirectory(prefix="minimind-vision-tests-")
MEDIA = Path(_tmp.name) / "media"


def tiny_vlm_dir() -> Path:
    """A tiny random MiniMind-V (SigLIP 32x32, 4 features per image) with the minimind-3 tokenizer. The
    projector's output is scaled up so that images move the logits clearly."""
    path = Path(_tmp.name) / "tiny-vlm"
    if not path.is_dir():
        from models.loader import load_tokenizer
        from models.vision import MiniMindVLMConfig, MiniMindVLMForCausalLM
        from models.vision.export import write_vlm_dir

        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
        config = MiniMindVLMConfig(vision_config=vision, image_token_id=12, **tiny_config().to_diff_dict())
        torch.manual_seed(0)
        model = MiniMindVLMForCausalLM(config).eval()
        with torch.no_grad():
            model.vision_proj.mlp[3].weight.mul_(20)
        write_vlm_dir(path, model, load_tokenizer(UPSTREAM_FIXTURES / "minimind3-v"))
    return path


def png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def vision_server():
    needs_own_server("a vision model")
    MEDIA.mkdir(parents=True, exist_ok=True)
    return start_server("--allowed-local-media-path", str(MEDIA), "--max-image-bytes", "64KiB", model=tiny_vlm_dir())


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def first_token_logprobs(server, content: list[dict], messages: list[dict] | None = None) -> dict[str, float]:
    """Top-5 logprobs of the first answer token to one user message of `content` parts (or to `messages`)."""
    answer = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=messages or [{"role": "user", "content": content}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    return {t.token: t.logprob for t in answer.choices[0].logprobs.content[0].top_logprobs}


def differ(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() != b.keys() or any(abs(a[k] - b[k]) > 1e-3 for k in a)


def test_an_image_changes_the_answer():
    server = vision_server()
    question = {"type": "text", "text": "What colour is this?"}
    text_only = first_token_logprobs(server, [question])
    red = first_token_logprobs(server, [image_part(data_url(png((255, 0, 0)))), question])
    blue = first_token_logprobs(server, [image_part(data_url(png((0, 0, 255)))), question])
    assert differ(text_only, red) and differ(red, blue)
    assert red == pytest.approx(first_token_logprobs(server, [image_part(data_url(png((255, 0, 0)))), question]))


def test_several_images_in_one_message_and_across_turns():
    server = vision_server()
    red, blue = image_part(data_url(png((255, 0, 0)))), image_part(data_url(png((0, 0, 255))))
    sdk = client(server)
    one = sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": [red]}], max_tokens=1)
    two = sdk.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": [red, blue]}], max_tokens=1
    )
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == IMAGE_TOKEN_LEN + 1  # 4 placeholders + newline
    turns = [
        {"role": "user", "content": [red, {"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [blue]},
    ]
    assert differ(first_token_logprobs(server, [], turns[:1]), first_token_logprobs(server, [], turns))
    later_image_swapped = [*turns[:2], {"role": "user", "content": [red]}]
    assert differ(first_token_logprobs(server, [], turns), first_token_logprobs(server, [], later_image_swapped))
    assert differ(first_token_logprobs(server, [red, blue]), first_token_logprobs(server, [blue, red]))


def test_text_and_image_requests_batch_together():
    server = vision_server()
    contents = [[{"type": "text", "text": f"question {i}"}] for i in range(3)]
    contents += [[image_part(data_url(png((40 * i, 200, 0)))), {"type": "text", "text": "?"}] for i in range(3)]
    alone = [first_token_logprobs(server, c) for c in contents]
    with ThreadPoolExecutor(len(contents)) as pool:
        together = list(pool.map(lambda c: first_token_logprobs(server, c), contents * 2))
    for expected, got in zip(alone * 2, together):
        assert got == pytest.approx(expected, abs=1e-4)


def test_local_files_only_under_the_allowed_directory(tmp_path):
    server = vision_server()
    (MEDIA / "red.png").write_bytes(png((255, 0, 0)))
    from_file = first_token_logprobs(server, [image_part((MEDIA / "red.png").as_uri())])
    assert from_file == pytest.approx(first_token_logprobs(server, [image_part(data_url(png((255, 0, 0))))]))
    (tmp_path / "red.png").write_bytes(png((255, 0, 0)))
    with pytest.raises(openai.BadRequestError, match="outside the allowed media directory"):
        first_token_logprobs(server, [image_part((tmp_path / "red.png").as_uri())])


def noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/cat.png", "does not fetch remote images"),
        ("data:image/png;base64,@@not-base64@@", "not valid base64"),
        (data_url(b"%PDF-1.4 this is not an image"), "not a readable image"),
        (data_url(noise_png(200)), "more than the limit of 64"),
    ],
    ids=["remote", "bad-base64", "not-an-image", "too-large"],
)
def test_bad_images_get_400_in_the_error_shape(url, message):
    server = vision_server()
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        first_token_logprobs(server, [image_part(url)])
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == "messages[0].content[0].image_url"


def test_a_text_only_model_refuses_images():
    needs_own_server("a text model without an API key")
    server = start_server()
    with pytest.raises(openai.BadRequestError, match="text-only and cannot read images"):
        first_token_logprobs(server, [image_part(data_url(png((255, 0, 0))))])
