"""Helpers shared by the training tests: a tiny tokenizer trained once, tiny model shapes, JSONL writers.

Everything is sized for CPU seconds: a 320-token BPE vocabulary, a 2-layer 32-wide model, 32-token sequences.
"""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
}
WORDS = "the model reads text and learns to predict the next token from the tokens before it".split()
HANZI = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append("".join(rng.choice(HANZI) for _ in range(rng.randint(4, 20))))
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))))
    return out


@functools.cache
def tokenizer_dir() -> Path:
    """A 320-token byte-level BPE tokenizer with the project's ChatML template, trained once per session."""
    from models.tokenizer import save_tokenizer, train_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="minimind-train-tok-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    data = write_jsonl(folder / "data.jsonl", [{"text": t} for t in sentences(400)])
    return save_tokenizer(train_tokenizer(data, vocab_size=320), folder / "tokenizer")


def conversation(n: int) -> dict[str, Any]:
    """A two-turn conversation whose answers depend on the question (so an SFT loss can fall)."""
    a, b = WORDS[n % len(WORDS)], WORDS[(n * 7) % len(WORDS)]
    return {
        "conversations": [
            {"role": "user", "content": f"say {a}"},
            {"role": "assistant", "content": f"{a} {a} {a}"},
            {"role": "user", "content": f"and {b}?"},
            {"role": "assistant", "content": f"{b} then {a}"},
        ]
    }


def config_values(tmp: Path, stage: str = "pretrain", **overrides: Any) -> dict[str, Any]:
    """TrainConfig fields for a tiny CPU run writing under `tmp`."""
    values: dict[str, Any] = {
        "stage": stage,
        "tokenizer": str(tokenizer_dir()),
        "model_config": dict(TINY_MODEL),
        "max_seq_len": 32,
        "batch_size": 4,
        "max_steps": 4,
        "lr": 3e-3,
        "warmup_steps": 1,
        "device": "cpu",
        "report_to": "none",
        "log_every": 1,
        "save_every": 0,
        "cache_dir": str(tmp / "cache"),
        "output_dir": str(tmp / f"run-{stage}"),
    }
    values.update(overrides)
    return values


def train(tmp: Path, stage: str = "pretrain", **overrides: Any) -> Path:
    """Run the trainer in-process; returns the run directory."""
    from training.config import TrainConfig
    from training.stages import get_stage
    from training.trainer import Trainer

    cfg = TrainConfig(**config_values(tmp, stage, **overrides))
    Trainer(cfg, get_stage(stage)).run()
    return cfg.resolved_output_dir()


def metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step (a later line for the same step wins, as after a resume)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}
