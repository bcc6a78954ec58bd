"""A synthetic picture set for MiniMind-V demos: shapes in colours at positions, rendered with PIL, with
templated captions and question/answer conversations (JSONL + image folder, the vlm-* stages' format), and a
small tokenizer trained on its text (with `<|image_pad|>`), so configs/vlm-demo.yaml trains with nothing else.

Every answer is a single word read off the drawing, so held-out accuracy is a plain exact-match count.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right")
QUESTIONS = {
    "colour": "<image>\nWhat colour is the shape?",
    "shape": "<image>\nWhat shape is in the picture?",
    "position": "<image>\nIs the shape on the left or on the right?",
}


def render(shape: str, colour: str, position: str, size: int = 64, jitter: random.Random | None = None) -> Image.Image:
    """One white picture with one shape; `jitter` moves and scales it a little so no two are alike."""
    rng = jitter or random.Random(0)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.14, 0.22)
    cx = size * (0.28 if position == "left" else 0.72) + rng.uniform(-2, 2)
    cy = size * 0.5 + rng.uniform(-size * 0.2, size * 0.2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


TOKENIZER_VOCAB = 384  # the byte alphabet, the special tokens and ~100 merges: every question word is a few tokens


def build_vlm_demo(out: Path, count: int = 600, test_fraction: float = 0.1, seed: int = 0) -> dict[str, int]:
    """OUT/images/*.png, OUT/train.jsonl and OUT/test.jsonl (one conversation per question and picture),
    OUT/tokenizer/ (trained on train.jsonl)."""
    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for n in range(count):
        shape, colour, position = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(POSITIONS)
        name = f"{n:05d}.png"
        render(shape, colour, position, jitter=rng).save(images / name)
        split = "test" if n < count * test_fraction else "train"
        answers = {"colour": colour, "shape": shape, "position": position}
        for kind, question in QUESTIONS.items():
            conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answers[kind]}]
            rows[split].append({"image": f"images/{name}", "conversations": conversation, "kind": kind})
    for split, lines in rows.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    from models.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(out / "train.jsonl", vocab_size=TOKENIZER_VOCAB), out / "tokenizer")
    return {split: len(lines) for split, lines in rows.items()}
