"""Prompts for the RL stages: one JSONL line per prompt, `{"messages": [...], "answer": "..."}`.

`messages` are the conversation so far (usually a system and a user turn); the model answers it. `answer` is the
ground truth the rule rewards compare with (optional: a reward model or a user function may not need one);
`{"prompt": "..."}` is accepted as a single user turn. Prompts are small, so they are read into memory and
rendered with the chat template once (assistant turn opened; with `tools`, the template lists them); one longer than max_seq_len - max_completion_len
tokens is a bad line (the completion would not fit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.chat_masks import ROLES
from training.data import LineStats, bad_line, check_data_file
from training.errors import TrainingError


def prompt_messages(record: Any) -> tuple[list[dict[str, Any]], str | None]:
    """One JSONL record -> (messages, answer or None); ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    messages = record.get("messages", record.get("prompt"))
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected "messages": a non-empty list of {"role", "content"} objects (or "prompt": text)')
    for n, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f'messages[{n}] must be {{"role": one of {", ".join(ROLES)}, "content": text}}')
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise ValueError('"answer" must be text or a number')
    return messages, None if answer is None else str(answer)


class PromptDataset:
    """Items: {"prompt_ids": [...], "messages": [...], "answer": str | None}."""

    def __init__(
        self,
        files: list[Path],
        tokenizer: Any,
        max_prompt_len: int,
        skip_bad_lines: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        self.items: list[dict[str, Any]] = []
        stats = LineStats()
        for path in files:
            check_data_file(path)
            with path.open("rb") as handle:
                for lineno, raw in enumerate(handle, start=1):
                    if not raw.strip():
                        continue
                    stats.lines += 1
                    try:
                        messages, answer = prompt_messages(json.loads(raw))
                        text = tokenizer.apply_chat_template(
                            messages, tools=tools, tokenize=False, add_generation_prompt=True
                        )
                        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                        if len(ids) > max_prompt_len:
                            raise ValueError(
                                f"the prompt has {len(ids)} tokens, more than max_seq_len - max_completion_len = "
                                f"{max_prompt_len} (raise max_seq_len or shorten the prompt)"
                            )
                    except (ValueError, UnicodeDecodeError) as err:
                        reason = f"invalid JSON ({err.msg})" if isinstance(err, json.JSONDecodeError) else str(err)
                        bad_line(path, lineno, reason, skip_bad_lines, stats)
                        continue
                    self.items.append({"prompt_ids": ids, "messages": messages, "answer": answer})
        self.bad_lines = stats.bad
        if not self.items:
            raise TrainingError(f"no usable prompts in {', '.join(str(p) for p in files)}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]
