"""Perplexity: exp(mean negative log-likelihood per predicted token) over a JSONL file's "text" fields (each a
document) or a plain text file (one document). Long documents are scored in sliding windows of `window`
tokens that advance by `stride`, so every token after the first is predicted with up to window - stride
tokens of context (the method of Hugging Face's perplexity guide)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evaluation.backends import EvalError, EvalModel


def read_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise EvalError(f"{path}: no such data file")
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise EvalError(f"{path}: the file is empty")
        return [text]
    docs = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise EvalError(f'{path}:{lineno}: expected a JSON object with a "text" string') from None
            if text:
                docs.append(text)
    if not docs:
        raise EvalError(f"{path}: no documents")
    return docs


def evaluate_ppl(model: EvalModel, docs: list[str], window: int = 512, stride: int = 256) -> dict[str, Any]:
    total, count = 0.0, 0
    for doc in docs:
        scores = model.token_logprobs(doc, window, stride)
        total -= sum(scores)
        count += len(scores)
    if not count:
        raise EvalError("no token was scored (documents of one token each?)")
    return {
        "model": model.name,
        "documents": len(docs),
        "tokens": count,
        "nll_per_token": total / count,
        "perplexity": math.exp(total / count),
        "window": window,
        "stride": stride,
    }
