"""The offline demo model: configs/vlm-demo.yaml trained on `minimind data vlm-demo`'s pictures answers held-out
questions (colour, shape, left/right) right at least 90% of the time, and through a live server the real OpenAI
SDK gets the colour and shape of a held-out picture sent as a data URL, which the same question without the
picture does not get. Trained once per session (minutes on CPU), hence slow."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from minimind.cli import main
from tests.conftest import ROOT
from tests.test_server_support import MODEL_NAME, start_server

pytestmark = pytest.mark.slow

QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is in the picture?"}


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> tuple[Path, Path]:
    """(the trained model directory, the data folder), made by the two documented commands."""
    root = tmp_path_factory.mktemp("vlm-demo")
    data = root / "data"
    assert main(["data", "vlm-demo", str(data)]) == 0
    args = ["train", "--config", str(ROOT / "configs" / "vlm-demo.yaml"), "--device", "cpu", "--report-to", "none"]
    args += ["--tokenizer", str(data / "tokenizer"), "--data-path", str(data / "train.jsonl")]
    args += ["--output-dir", str(root / "run")]
    assert main(args) == 0
    return root / "run" / "final", data


def test_held_out_accuracy_is_at_least_90_percent(demo_model):
    from evaluation.backends import LocalModel
    from evaluation.vlm import evaluate_vlm, read_image_questions

    model, data = demo_model
    result = evaluate_vlm(LocalModel(str(model)), read_image_questions(data / "test.jsonl"))
    assert set(result["kinds"]) == {"colour", "shape", "position"} and result["questions"] == 180
    assert result["accuracy"] >= 0.9, result["kinds"]


def test_the_server_names_colour_and_shape_of_a_held_out_picture(demo_model):
    import openai

    model, data = demo_model
    server = start_server(model=model)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

    def ask(question: str, image: Path | None) -> str:
        content: list[dict] = [{"type": "text", "text": question}]
        if image is not None:
            url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
        )
        return (reply.choices[0].message.content or "").strip().lower()

    blind = {kind: ask(question, None) for kind, question in QUESTIONS.items()}
    truth: dict[str, dict[str, str]] = {}  # picture -> {kind: answer}, held-out rows only
    for line in (data / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        truth.setdefault(row["image"], {})[row["kind"]] = row["conversations"][1]["content"]
    # a held-out picture whose colour and shape both differ from what the model says without a picture
    picture, answers = next(
        (name, kinds) for name, kinds in truth.items() if all(kinds[k] != blind[k] for k in QUESTIONS)
    )
    for kind, question in QUESTIONS.items():
        assert ask(question, data / picture) == answers[kind], (kind, picture, blind)
        assert blind[kind] != answers[kind]
