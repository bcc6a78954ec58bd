"""`minimind eval vlm`: bad rows are named by file and line; a text-only model is refused with the reason."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from minimind.cli import main
from tests.conftest import tiny_model


def write_rows(folder, rows) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "red.png")
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"image": "blue.png", "conversations": turn("<image>\nColour?", "blue")},
            "test.jsonl:1: image file not found",
        ),
        ({"image": "red.png", "conversations": turn("<image><image>", "red")}, "test.jsonl:1: 2 <image> markers but 1"),
        ({"image": "red.png", "conversations": "red"}, 'test.jsonl:1: expected {"image"'),
    ],
)
def test_bad_rows_are_named(tmp_path, capsys, row, message):
    from evaluation.backends import EvalError
    from evaluation.vlm import read_image_questions

    data = write_rows(tmp_path / "data", [row])
    with pytest.raises(EvalError, match=message.replace("{", r"\{")):
        read_image_questions(tmp_path / "data" / "test.jsonl")
    assert data


def test_a_text_only_model_is_refused(tmp_path, capsys):
    from models.loader import load_tokenizer
    from tests.conftest import UPSTREAM_FIXTURES

    model_dir = tmp_path / "llm"
    tiny_model().save_pretrained(model_dir)
    load_tokenizer(UPSTREAM_FIXTURES / "minimind3-v").save_pretrained(model_dir)
    data = write_rows(tmp_path / "data", [{"image": "red.png", "conversations": turn("Colour?", "red")}])
    assert main(["eval", "vlm", "--model", str(model_dir), "--data", data]) == 1
    assert "not a vision-language model (it has no vision encoder)" in capsys.readouterr().err
