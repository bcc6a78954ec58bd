"""Separate a thinking model's reasoning (`<think>...</think>`) from its answer, whole or while streaming.

Used by the server (`reasoning_content`), the chat CLI and the web UI. Two template styles exist:
the model writes `<think>` itself (MiniMind2, Qwen3), or the chat template already put `<think>` at the
end of the prompt (MiniMind3 with open_thinking, DeepSeek-R1) so the completion starts inside the
reasoning. Pass `opened=True` for the second (`reasoning_opened_by_prompt(prompt)` tells), though
`split_reasoning` also recognises it from a `</think>` with no `<think>` before it.

Whitespace follows the MiniMind/Qwen3 chat templates: newlines around the reasoning and before the
answer are not part of either.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def reasoning_opened_by_prompt(prompt: str) -> bool:
    """True when the rendered prompt ends inside an open `<think>` block."""
    return prompt.rstrip().endswith(OPEN)


def split_reasoning(text: str, *, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a finished completion; reasoning is None when the model did not think.
    An unclosed `<think>` (output cut by max_tokens) makes everything reasoning and the content empty."""
    stripped = text.lstrip()
    if stripped.startswith(OPEN):
        body = stripped[len(OPEN) :]
    elif opened or CLOSE in text:
        body = text
    else:
        return None, text
    reasoning, _, content = body.partition(CLOSE)
    return (reasoning.strip("\n") or None), content.lstrip("\n")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (a tag split across deltas)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ReasoningStreamParser:
    """Streaming form of `split_reasoning`: `feed(delta)` returns (reasoning_delta, content_delta), holding
    back only what may be part of a tag or whitespace that the finished split would drop; `flush()` at the
    end returns what is left. The concatenated deltas equal `split_reasoning(full_text, opened=opened)`
    (with "" for None), except that a `</think>` without `opened` or a leading `<think>` stays content."""

    def __init__(self, opened: bool = False) -> None:
        self._state = "reasoning_start" if opened else "start"
        self._buf = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        reasoning, content = "", ""
        while True:
            state, buf = self._state, self._buf
            if state == "start":
                head = buf.lstrip()
                if head.startswith(OPEN):
                    self._state, self._buf = "reasoning_start", head[len(OPEN) :]
                    continue
                if head == "" or OPEN.startswith(head):
                    break  # whitespace or a partial "<think": wait
                self._state = "content"
                continue
            if state == "reasoning_start":
                self._buf = buf.lstrip("\n")
                if self._buf:
                    self._state = "reasoning"
                    continue
                break
            if state == "reasoning":
                before, found, after = buf.partition(CLOSE)
                if found:
                    reasoning += before.rstrip("\n")
                    self._state, self._buf = "content_start", after
                    continue
                keep = _partial_suffix(buf, CLOSE)
                ready = buf[: len(buf) - keep]
                safe = ready.rstrip("\n")  # trailing newlines: dropped if </think> follows
                reasoning += safe
                self._buf = buf[len(safe) :]
                break
            if state == "content_start":
                self._buf = buf.lstrip("\n")
                if self._buf:
                    self._state = "content"
                    continue
                break
            content += buf
            self._buf = ""
            break
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """End of the completion: hand out what was held back."""
        buf, self._buf = self._buf, ""
        if self._state == "start":
            return "", buf
        if self._state == "reasoning":
            return buf.rstrip("\n"), ""
        if self._state == "content":
            return "", buf
        return "", ""
