"""MiniMind JSONL datasets, read lazily and tokenized once into a memory-mapped cache.

A JSONL file is streamed line by line (never held in RAM) and tokenized into flat binary arrays on disk
(`tokens.bin`, plus `trained.bin` and `offsets.npy` for SFT). Training then slices a `numpy.memmap`, so a 10 GB
file costs page cache, not process memory, and a second run skips tokenization. The cache key covers the file
(path, size, mtime), the tokenizer and the format version, so a changed file or tokenizer is re-tokenized.

- Pretrain: documents `{"text": ...}` are concatenated with EOS after each one and cut into full-length
  sequences of max_seq_len + 1 tokens (inputs = [:-1], targets = [1:]): no padding anywhere.
- SFT: `{"conversations": [...]}` rendered by the chat template; targets are -100 except assistant tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from array import array as int_array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.chat_masks import ConversationError, normalise_messages, tokenize_conversation
from training.config import minimind_home
from training.errors import TrainingError, os_errors

log = logging.getLogger("minimind.train")
CACHE_VERSION = 1
IGNORE = -100


@dataclass
class LineStats:
    lines: int = 0
    bad: int = 0


def iter_jsonl(path: Path, key: str, skip_bad_lines: bool, stats: LineStats) -> Iterator[tuple[int, Any]]:
    """(line number, value of `key`) for each non-empty line; a bad line raises with file:line or is counted."""
    for lineno, record in iter_jsonl_records(path, key, skip_bad_lines, stats):
        yield lineno, record[key]


def iter_jsonl_records(path: Path, key: str, skip_bad_lines: bool, stats: LineStats) -> Iterator[tuple[int, dict]]:
    """(line number, whole object) for each non-empty line holding a `key` field, checked as `iter_jsonl` does
    (for rows that carry more than one field, e.g. conversations and their images)."""
    check_data_file(path)
    with os_errors(f"cannot read data file {path}", "--data-path"), path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            stats.lines += 1
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or key not in record:
                    raise ValueError(f'expected a JSON object with a "{key}" field')
                if b"\\ud" in raw or b"\\uD" in raw:  # only an escape can put a surrogate into decoded JSON
                    check_surrogates(record[key], key)
            except (ValueError, UnicodeDecodeError) as err:
                reason = f"invalid JSON ({err.msg})" if isinstance(err, json.JSONDecodeError) else str(err)
                bad_line(path, lineno, reason, skip_bad_lines, stats)
                continue
            yield lineno, record


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_surrogates(value: Any, field: str) -> None:
    """Refuse a lone UTF-16 surrogate ("\\ud800" is valid JSON but not text: no tokenizer can encode it).

    json has already joined valid surrogate pairs into one character, so any surrogate left is a lone one.
    """
    if isinstance(value, str):
        found = LONE_SURROGATE.search(value)
        if found:
            raise ValueError(
                f'field "{field}" holds a lone UTF-16 surrogate (\\u{ord(found.group()):04x}), which is not text'
            )
    elif isinstance(value, list):
        for n, item in enumerate(value):
            check_surrogates(item, f"{field}[{n}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            check_surrogates(name, f"{field} (a key)")
            check_surrogates(item, f"{field}.{name}")


def check_data_file(path: Path) -> None:
    if not path.is_file():
        raise TrainingError(
            f"data file {path} not found; check data_path (build a demo set with `minimind data demo DIR`)"
        )


def bad_line(path: Path, lineno: int, reason: str, skip: bool, stats: LineStats) -> None:
    if not skip:
        raise TrainingError(
            f"{path}:{lineno}: {reason} (fix the line, or pass --skip-bad-lines true to skip such lines)"
        )
    stats.bad += 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer by its vocabulary and chat template, not by where it was loaded from."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    template = str(getattr(tokenizer, "chat_template", "") or "")
    return hashlib.sha256((vocab + template + str(tokenizer.eos_token_id)).encode()).hexdigest()[:16]


def cache_dir_for(kind: str, path: Path, tokenizer: Any, skip_bad_lines: bool, root: str = "") -> Path:
    check_data_file(path)
    stat = path.stat()
    key = json.dumps(
        [
            CACHE_VERSION,
            kind,
            str(path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            tokenizer_fingerprint(tokenizer),
            skip_bad_lines,
        ]
    )
    base = Path(root).expanduser() if root else minimind_home() / "cache" / "data"
    return base / f"{kind}-{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _build_atomically(target: Path, build) -> dict[str, Any]:
    """Run build(tmp_dir) -> meta, then rename tmp_dir to target, so an interrupted build leaves no half cache."""
    meta_path = target / "meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    tmp = target.with_name(target.name + f".tmp-{np.random.randint(1 << 30)}")
    tmp.mkdir(parents=True)
    try:
        meta = build(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads(meta_path.read_text())


def token_dtype(tokenizer: Any) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) < 65536 else np.dtype(np.uint32)


def tokenize_pretrain(
    path: Path, tokenizer: Any, skip_bad_lines: bool, out: Path, batch_chars: int = 1 << 16
) -> dict[str, Any]:
    """Stream {"text"} lines into tokens.bin: each document's tokens followed by EOS.

    Lines are tokenized in batches of about `batch_chars` characters, so memory stays bounded by the batch
    (token ids are Python ints until written), whatever the file's size.
    """
    eos, dtype, stats, count = tokenizer.eos_token_id, token_dtype(tokenizer), LineStats(), 0
    if eos is None:
        raise TrainingError("the tokenizer has no eos_token; pretraining needs it to separate documents")
    with (out / "tokens.bin").open("wb") as sink:

        def flush(texts: list[str]) -> int:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=dtype)
            sink.write(flat.tobytes())
            return len(flat)

        texts: list[str] = []
        chars = 0
        for lineno, text in iter_jsonl(path, "text", skip_bad_lines, stats):
            if not isinstance(text, str) or not text:
                bad_line(path, lineno, '"text" must be a non-empty string', skip_bad_lines, stats)
                continue
            texts.append(text)
            chars += len(text)
            if chars >= batch_chars:
                count, texts, chars = count + flush(texts), [], 0
        if texts:
            count += flush(texts)
    return {"num_tokens": count, "dtype": dtype.name, "lines": stats.lines, "bad_lines": stats.bad}


def tokenize_sft(path: Path, tokenizer: Any, skip_bad_lines: bool, out: Path) -> dict[str, Any]:
    """Stream {"conversations"} lines into tokens.bin + trained.bin (1 = trained target) + offsets.npy."""
    dtype, stats, offsets = token_dtype(tokenizer), LineStats(), int_array("q", [0])  # 8 bytes per conversation
    with (out / "tokens.bin").open("wb") as tokens_sink, (out / "trained.bin").open("wb") as trained_sink:
        for lineno, conversations in iter_jsonl(path, "conversations", skip_bad_lines, stats):
            try:
                messages, tools = normalise_messages(conversations)
                ids, trained = tokenize_conversation(tokenizer, messages, tools)
            except ConversationError as err:
                bad_line(path, lineno, str(err), skip_bad_lines, stats)
                continue
            tokens_sink.write(np.asarray(ids, dtype=dtype).tobytes())
            trained_sink.write(np.asarray(trained, dtype=np.uint8).tobytes())
            offsets.append(offsets[-1] + len(ids))
    np.save(out / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    return {"num_tokens": offsets[-1], "dtype": dtype.name, "lines": stats.lines, "bad_lines": stats.bad}


class PretrainDataset:
    """Packed sequences over the concatenated token stream of one or more files."""

    def __init__(
        self, files: list[Path], tokenizer: Any, seq_len: int, skip_bad_lines: bool = False, cache_dir: str = ""
    ) -> None:
        self.seq_len = seq_len
        self.bad_lines = 0
        arrays = []
        for path in files:
            target = cache_dir_for("pretrain", path, tokenizer, skip_bad_lines, cache_dir)
            with os_errors(f"cannot write the tokenized-data cache {target}", "--cache-dir"):
                meta = _build_atomically(
                    target, lambda tmp, p=path: tokenize_pretrain(p, tokenizer, skip_bad_lines, tmp)
                )
            self.bad_lines += meta["bad_lines"]
            if meta["num_tokens"]:
                arrays.append(np.memmap(target / "tokens.bin", dtype=meta["dtype"], mode="r"))
        self.arrays = arrays
        self.bounds = np.cumsum([0] + [len(a) for a in arrays])
        self.num_tokens = int(self.bounds[-1])
        self.length = max(0, (self.num_tokens - 1) // seq_len)
        if self.length == 0:
            raise TrainingError(
                f"{', '.join(map(str, files))}: {self.num_tokens} tokens is less than one sequence of max_seq_len+1="
                f"{seq_len + 1}; add data or lower max_seq_len"
            )

    def __len__(self) -> int:
        return self.length

    def _slice(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for n, array in enumerate(self.arrays):
            lo, hi = max(start, self.bounds[n]), min(stop, self.bounds[n + 1])
            if lo < hi:
                parts.append(array[lo - self.bounds[n] : hi - self.bounds[n]])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.seq_len
        chunk = torch.from_numpy(self._slice(start, start + self.seq_len + 1).astype(np.int64))
        return {"input_ids": chunk[:-1], "targets": chunk[1:]}


class SFTDataset:
    """One conversation per item, truncated to max_seq_len + 1 tokens; targets -100 outside assistant turns.

    Per file: memory-mapped tokens and trained flags plus the conversations' start offsets (memory-mapped too),
    so a file of millions of conversations costs no Python objects per conversation.
    """

    def __init__(
        self, files: list[Path], tokenizer: Any, seq_len: int, skip_bad_lines: bool = False, cache_dir: str = ""
    ) -> None:
        self.seq_len = seq_len
        self.bad_lines = 0
        self.parts: list[tuple[np.memmap, np.memmap, np.ndarray]] = []
        self.num_tokens = 0
        for path in files:
            target = cache_dir_for("sft", path, tokenizer, skip_bad_lines, cache_dir)
            with os_errors(f"cannot write the tokenized-data cache {target}", "--cache-dir"):
                meta = _build_atomically(target, lambda tmp, p=path: tokenize_sft(p, tokenizer, skip_bad_lines, tmp))
            self.bad_lines += meta["bad_lines"]
            if not meta["num_tokens"]:
                continue
            tokens = np.memmap(target / "tokens.bin", dtype=meta["dtype"], mode="r")
            trained = np.memmap(target / "trained.bin", dtype=np.uint8, mode="r")
            self.parts.append((tokens, trained, np.load(target / "offsets.npy", mmap_mode="r")))
            self.num_tokens += meta["num_tokens"]
        self.starts = np.cumsum([0] + [len(offsets) - 1 for _, _, offsets in self.parts])
        if self.starts[-1] == 0:
            raise TrainingError(f"{', '.join(map(str, files))}: no usable conversations")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        tokens, trained, offsets = self.parts[part]
        local = index - int(self.starts[part])
        start, stop = int(offsets[local]), int(offsets[local + 1])
        stop = min(stop, start + self.seq_len + 1)
        ids = torch.from_numpy(tokens[start:stop].astype(np.int64))
        mask = torch.from_numpy(trained[start:stop].astype(bool))
        targets = torch.where(mask, ids, IGNORE)
        return {"input_ids": ids[:-1], "targets": targets[1:]}


def pad_collate(items: list[dict[str, torch.Tensor]], pad_id: int, multiple: int = 16) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest item (rounded up to `multiple`, fewer distinct shapes); pad targets -100."""
    longest = max(len(item["input_ids"]) for item in items)
    width = -(-longest // multiple) * multiple
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n], targets[row, :n] = item["input_ids"], item["targets"]
    return {"input_ids": input_ids, "targets": targets}
