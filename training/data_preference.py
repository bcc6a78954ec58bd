"""Preference pairs for DPO, tokenized once into the same memory-mapped cache layout as SFT (training/data.py).

Two line shapes are read:
- upstream MiniMind's dpo.jsonl: `{"chosen": [{"role", "content"}, ...], "rejected": [...]}`, two whole
  conversations that share their prompt turns and differ in the last assistant turn;
- the flat form: `{"prompt": "...", "chosen": "...", "rejected": "..."}` (the prompt may also be a list of
  turns, and chosen/rejected lists of assistant turns, as in TRL's conversational format).
Each side is rendered by the chat template and masked like SFT (training/chat_masks.py): only assistant tokens
count in its log-probability. The cache stores chosen as sequence 2i and rejected as 2i + 1.
"""

from __future__ import annotations

import json
from array import array as int_array
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.chat_masks import ConversationError, normalise_messages, tokenize_conversation
from training.data import (
    IGNORE,
    LineStats,
    _build_atomically,
    bad_line,
    cache_dir_for,
    check_data_file,
    pad_collate,
    token_dtype,
)
from training.errors import TrainingError


def preference_conversations(record: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One JSONL record -> (chosen conversation, rejected conversation) as lists of turns."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ConversationError('expected a JSON object with "chosen" and "rejected" fields')
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is not None and not isinstance(prompt, list):
        raise ConversationError('"prompt" must be a string or a list of {"role", "content"} turns')

    def side(name: str) -> list[dict[str, Any]]:
        value = record[name]
        if isinstance(value, str):
            if prompt is None:
                raise ConversationError(f'"{name}" is a string, so the line needs a "prompt" too')
            value = [{"role": "assistant", "content": value}]
        if not isinstance(value, list):
            raise ConversationError(f'"{name}" must be a string or a list of {{"role", "content"}} turns')
        return list(prompt or []) + value

    return side("chosen"), side("rejected")


def tokenize_preferences(path: Path, tokenizer: Any, skip_bad_lines: bool, out: Path) -> dict[str, Any]:
    """Stream preference lines into tokens.bin + trained.bin + offsets.npy (two sequences per pair)."""
    dtype, stats, offsets = token_dtype(tokenizer), LineStats(), int_array("q", [0])
    check_data_file(path)
    with (
        path.open("rb") as handle,
        (out / "tokens.bin").open("wb") as tokens_sink,
        (out / "trained.bin").open("wb") as trained_sink,
    ):
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            stats.lines += 1
            try:
                sides = [normalise_messages(turns) for turns in preference_conversations(json.loads(raw))]
                encoded = [tokenize_conversation(tokenizer, messages, tools) for messages, tools in sides]
            except (ConversationError, ValueError, UnicodeDecodeError) as err:
                reason = f"invalid JSON ({err.msg})" if isinstance(err, json.JSONDecodeError) else str(err)
                bad_line(path, lineno, reason, skip_bad_lines, stats)
                continue
            for ids, trained in encoded:
                tokens_sink.write(np.asarray(ids, dtype=dtype).tobytes())
                trained_sink.write(np.asarray(trained, dtype=np.uint8).tobytes())
                offsets.append(offsets[-1] + len(ids))
    np.save(out / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    return {"num_tokens": offsets[-1], "dtype": dtype.name, "lines": stats.lines, "bad_lines": stats.bad}


class PreferenceDataset:
    """Item i: the chosen and rejected sequences of pair i, each cut to max_seq_len + 1 tokens."""

    def __init__(
        self, files: list[Path], tokenizer: Any, seq_len: int, skip_bad_lines: bool = False, cache_dir: str = ""
    ) -> None:
        self.seq_len, self.bad_lines, self.parts = seq_len, 0, []
        for path in files:
            target = cache_dir_for("dpo", path, tokenizer, skip_bad_lines, cache_dir)
            meta = _build_atomically(
                target, lambda tmp, p=path: tokenize_preferences(p, tokenizer, skip_bad_lines, tmp)
            )
            self.bad_lines += meta["bad_lines"]
            if not meta["num_tokens"]:
                continue
            tokens = np.memmap(target / "tokens.bin", dtype=meta["dtype"], mode="r")
            trained = np.memmap(target / "trained.bin", dtype=np.uint8, mode="r")
            self.parts.append((tokens, trained, np.load(target / "offsets.npy", mmap_mode="r")))
        self.starts = np.cumsum([0] + [(len(offsets) - 1) // 2 for _, _, offsets in self.parts])
        if self.starts[-1] == 0:
            raise TrainingError(f"{', '.join(map(str, files))}: no usable preference pairs")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _sequence(self, part: int, n: int) -> dict[str, torch.Tensor]:
        tokens, trained, offsets = self.parts[part]
        start, stop = int(offsets[n]), int(offsets[n + 1])
        stop = min(stop, start + self.seq_len + 1)
        ids = torch.from_numpy(tokens[start:stop].astype(np.int64))
        mask = torch.from_numpy(trained[start:stop].astype(bool))
        return {"input_ids": ids[:-1], "targets": torch.where(mask, ids, IGNORE)[1:]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        local = index - int(self.starts[part])
        return {
            "index": index,
            "chosen": self._sequence(part, 2 * local),
            "rejected": self._sequence(part, 2 * local + 1),
        }


def preference_collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows, chosen first then rejected (one forward for both, as TRL does), plus the
    pairs' dataset indices (for precomputed reference log-probs)."""
    batch = pad_collate([item["chosen"] for item in items] + [item["rejected"] for item in items], pad_id)
    batch["pair_index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return batch
