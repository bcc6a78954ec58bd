"""Questions about pictures, scored by exact match (`minimind eval vlm`).

Rows are the vlm-* stages' JSONL: `{"image": "a.png" | [...], "conversations": [user, assistant], "kind": ...}`,
images relative to the file's folder (or `image_dir`). The user turn is asked with its images (an `<image>`
marker per image; without markers the images go first, as in training) and the model's greedy answer is right
when it equals the assistant turn, ignoring case, surrounding spaces and end punctuation. Accuracy is reported
overall and per `kind` (colour, shape, position in the set `minimind data vlm-demo` writes; rows without one
count under "all").
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.backends import EvalError, EvalModel
from models.vision.config import IMAGE_MARKER


@dataclass
class ImageQuestion:
    question: str  # the user turn, one IMAGE_MARKER per image
    images: list[bytes]
    answer: str
    kind: str
    where: str  # FILE:LINE, for messages


def read_image_questions(path: Path, image_dir: Path | None = None) -> list[ImageQuestion]:
    """Every row of a JSONL file as a question with its images (read now, so a missing file fails early)."""
    if not path.is_file():
        raise EvalError(f"{path}: no such data file")
    folder = image_dir or path.parent
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            user, assistant = row["conversations"][:2]
            question, answer = str(user["content"]), str(assistant["content"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise EvalError(
                f'{where}: expected {{"image": ..., "conversations": [{{"role": "user", ...}}, '
                '{"role": "assistant", ...}]}'
            ) from None
        names = row.get("image") or row.get("images") or []
        names = [names] if isinstance(names, str) else list(names)
        files = [folder / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise EvalError(f"{where}: image file not found: {missing[0]} (pass --image-dir to their folder)")
        markers = question.count(IMAGE_MARKER)
        if markers == 0 and files:
            question = IMAGE_MARKER * len(files) + "\n" + question
        elif markers != len(files):
            raise EvalError(f"{where}: {markers} {IMAGE_MARKER} markers but {len(files)} images")
        images = [f.read_bytes() for f in files]
        questions.append(ImageQuestion(question, images, answer, str(row.get("kind") or "all"), where))
    if not questions:
        raise EvalError(f"{path}: no questions")
    return questions


def normalise(text: str) -> str:
    return text.strip().strip(".!?。").strip().lower()


def evaluate_vlm(model: EvalModel, questions: list[ImageQuestion], max_tokens: int = 16) -> dict[str, Any]:
    """Accuracy overall and per kind, and every answer (for reading the misses)."""
    by_kind: dict[str, list[bool]] = defaultdict(list)
    answers = []
    for q in questions:
        got = model.answer_with_images(q.question, q.images, max_tokens)
        right = normalise(got) == normalise(q.answer)
        by_kind[q.kind].append(right)
        answers.append({"where": q.where, "kind": q.kind, "expected": q.answer, "answer": got, "correct": right})
    hits = [a["correct"] for a in answers]
    return {
        "accuracy": sum(hits) / len(hits),
        "questions": len(hits),
        "kinds": {kind: {"accuracy": sum(v) / len(v), "questions": len(v)} for kind, v in sorted(by_kind.items())},
        "answers": answers,
    }
