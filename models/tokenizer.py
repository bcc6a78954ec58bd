"""Training MiniMind's tokenizer: byte-level BPE (HF `tokenizers`) with MiniMind's special-token layout and a
ChatML chat template, saved as a directory that `AutoTokenizer.from_pretrained` loads.

Token ids 0-2 are fixed because checkpoints depend on them: `<|endoftext|>` (pad/unk) = 0, `<|im_start|>`
(bos) = 1, `<|im_end|>` (eos) = 2. Reserved special slots follow, so later additions need no retraining; one of
them, id 12, is `<|image_pad|>` as in minimind-3, so a tokenizer trained here also serves a MiniMind-V. Then
the tool and think tags as ordinary added tokens (not "special": they must survive
`skip_special_tokens=True`, because the reasoning and tool-call parsers read them from the text).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.errors import ModelError

CORE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
NUM_RESERVED = 18  # ids 3..20, like minimind-3's layout (tags then start at 21)
IMAGE_PAD_ID = 12  # minimind-3's `<|image_pad|>`: MiniMind-V's image placeholder (models/vision/config.py)
CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")


class TokenizerDataError(ModelError):
    """Training data the tokenizer trainer cannot read; the message names the file and line."""


def special_tokens(num_reserved: int = NUM_RESERVED) -> list[str]:
    """Every token with a fixed id, in id order."""
    reserved = [f"<|reserved_{i}|>" for i in range(num_reserved)]
    slot = IMAGE_PAD_ID - len(CORE_SPECIAL)
    if slot < num_reserved:
        reserved[slot] = "<|image_pad|>"
    return CORE_SPECIAL + reserved + TAG_TOKENS


def chat_template() -> str:
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


def iter_texts(path: str | Path) -> Iterator[str]:
    """Texts of a JSONL file: `{"text": ...}` lines, and `{"conversations": [{"role", "content"}, ...]}` lines
    whose contents (and reasoning_content) are yielded one by one. Blank lines are skipped."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError as err:
        raise TokenizerDataError(f"{path}: file not found") from err
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TokenizerDataError(f"{where}: not valid JSON ({err.msg}); each line must be one object") from err
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
                for turn in record["conversations"]:
                    if not isinstance(turn, dict) or not isinstance(turn.get("content", ""), str):
                        raise TokenizerDataError(
                            f"{where}: each conversation turn must be an object with a string content"
                        )
                    for field in ("reasoning_content", "content"):
                        if turn.get(field):
                            yield turn[field]
            else:
                raise TokenizerDataError(
                    f'{where}: expected {{"text": "..."}} or {{"conversations": [{{"role": ..., "content": ...}}]}}'
                )


def train_tokenizer(data: str | Path, vocab_size: int = 6400, num_reserved: int = NUM_RESERVED) -> Any:
    """Train byte-level BPE on a JSONL file; returns a transformers PreTrainedTokenizerFast with the template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fixed = special_tokens(num_reserved)
    if vocab_size < len(fixed) + 256:
        raise TokenizerDataError(f"--vocab-size {vocab_size} is too small: it needs at least {len(fixed) + 256}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fixed,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text round-trips
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in iter_texts(data):
            seen += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise TokenizerDataError(f"{data}: no training text found (the file has no non-empty lines)")
    # The tags were placed at fixed ids as specials; re-register them as ordinary added tokens.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=chat_template(),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: Any, out: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json (chat template inside, readable by older transformers too)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    return out
