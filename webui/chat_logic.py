"""The chat page's logic, kept free of Streamlit so that it can be tested on its own.

History trimming, the request the page sends, folding a stream of chunks into one answer, and turning
client errors into sentences a person can act on. `webui/app.py` only draws what these return.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import openai

DEFAULT_API_BASE = "http://127.0.0.1:8998/v1"
# The server accepts any key unless it was started with one; the SDK insists on a non-empty string.
DEFAULT_API_KEY = "none"
# The page always sends max_tokens: without it the server may generate up to the end of the context window.
DEFAULT_MAX_TOKENS = 512


def api_settings_from_env(env: dict[str, str] | None = None) -> tuple[str, str]:
    """(base URL, key) from MINIMIND_API_BASE / MINIMIND_API_KEY, the same names docker compose sets."""
    env = os.environ if env is None else env
    base = env.get("MINIMIND_API_BASE", "").strip() or DEFAULT_API_BASE
    key = env.get("MINIMIND_API_KEY", "").strip() or DEFAULT_API_KEY
    return base, key


def trim_history(history: list[dict[str, Any]], max_turns: int) -> list[dict[str, Any]]:
    """The last `max_turns` exchanges of `history` (a turn = one user message and the answer to it).

    Counting user messages keeps a question and its answer together, so the model never sees an answer
    without the question it answered. max_turns=0 sends no history at all.
    """
    if max_turns <= 0:
        return []
    user_positions = [i for i, message in enumerate(history) if message["role"] == "user"]
    if len(user_positions) <= max_turns:
        return list(history)
    return list(history[user_positions[-max_turns] :])


def answered_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`history` without the exchanges whose answer failed or was stopped before any text arrived.

    Such an exchange stays on the page (with its error or "stopped") but is not sent again: the model would
    otherwise see a question with no answer, or two user messages in a row. A stopped answer with text is
    kept, as far as it went.
    """
    kept: list[dict[str, Any]] = []
    for message in history:
        unanswered = message.get("error") or message.get("stopped")
        if message["role"] == "assistant" and unanswered and not message["content"]:
            if kept and kept[-1]["role"] == "user":
                kept.pop()
            continue
        kept.append(message)
    return kept


def build_messages(
    system_prompt: str, history: list[dict[str, Any]], user_message: str, max_turns: int
) -> list[dict[str, str]]:
    """The OpenAI `messages` list: system prompt, the last `max_turns` turns, then the new user message.

    Only role and content go to the server: reasoning, usage and timings are the page's own notes, and the
    model's earlier reasoning is not sent back (as with OpenAI's reasoning models).
    """
    messages: list[dict[str, str]] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for message in trim_history(answered_history(history), max_turns):
        messages.append({"role": message["role"], "content": message["content"]})
    messages.append({"role": "user", "content": user_message})
    return messages


def completion_request(
    *,
    model: str,
    messages: list[dict[str, str]],
    temperature: float,
    top_p: float,
    max_tokens: int,
    thinking: bool,
) -> dict[str, Any]:
    """Keyword arguments for `client.chat.completions.create` (streamed, with usage in the last chunk).

    `enable_thinking` is the name Qwen3-style templates read; MiniMind-3's template reads `open_thinking`.
    Both are sent so that the switch works with either family; a template ignores names it doesn't use.
    """
    return {
        "model": model,
        "messages": messages,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": {"chat_template_kwargs": {"enable_thinking": thinking, "open_thinking": thinking}},
    }


@dataclass
class StreamAccumulator:
    """Folds streamed chat-completion chunks into the answer, its reasoning, usage and speed."""

    started_at: float = field(default_factory=time.perf_counter)
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    def feed(self, chunk: Any) -> tuple[str, str]:
        """Takes one chunk (an SDK ChatCompletionChunk); returns the (reasoning, content) text it added."""
        now = time.perf_counter()
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.prompt_tokens = usage.prompt_tokens
            self.completion_tokens = usage.completion_tokens
        reasoning_delta, content_delta = "", ""
        for choice in chunk.choices or []:
            delta = choice.delta
            # reasoning_content is not in the SDK's schema; the SDK keeps unknown fields as attributes.
            reasoning_delta += getattr(delta, "reasoning_content", None) or ""
            content_delta += delta.content or ""
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        if (reasoning_delta or content_delta) and self.first_token_at is None:
            self.first_token_at = now
        self.reasoning += reasoning_delta
        self.content += content_delta
        self.finished_at = now
        return reasoning_delta, content_delta

    def tokens_per_second(self) -> float | None:
        """Completion tokens over the time from the first streamed token to the last chunk."""
        if not self.completion_tokens or self.first_token_at is None or self.finished_at is None:
            return None
        elapsed = self.finished_at - self.first_token_at
        if elapsed <= 0:
            return None
        # The first token arrives at first_token_at, so the rate is over the tokens after it.
        return max(self.completion_tokens - 1, 1) / elapsed

    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    def stats_line(self, stopped: bool = False) -> str:
        """One line for under the answer: tokens, speed, time to first token, why it stopped."""
        parts = ["stopped"] if stopped else []
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            parts.append(f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens")
        speed = self.tokens_per_second()
        if speed is not None:
            parts.append(f"{speed:.1f} tok/s")
        ttft = self.time_to_first_token()
        if ttft is not None:
            parts.append(f"first token after {ttft:.2f} s")
        if self.finish_reason == "length":
            parts.append("cut at max tokens")
        return " · ".join(parts)

    def to_message(self, stopped: bool = False) -> dict[str, Any]:
        """The assistant entry kept in the page's history; `stopped`: the person stopped it midway."""
        message = {
            "role": "assistant",
            "content": self.content,
            "reasoning": self.reasoning or None,
            "stats": self.stats_line(stopped),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if stopped:
            message["stopped"] = True
        return message


def friendly_error(exc: BaseException, api_base: str) -> str:
    """A sentence saying what went wrong talking to the API and what to do about it (never a traceback)."""
    if isinstance(exc, openai.AuthenticationError):
        return (
            f"The API at {api_base} refused the key (401). Set MINIMIND_API_KEY, or enter the key the server "
            "was started with (`minimind serve --api-key ...`) in the sidebar."
        )
    if isinstance(exc, openai.RateLimitError):
        return (
            "The server is busy (429: its request queue is full). Wait a moment and send again, or start the "
            "server with a larger queue."
        )
    if isinstance(exc, openai.APITimeoutError):
        return f"The API at {api_base} did not answer in time. It may still be loading the model: try again shortly."
    if isinstance(exc, openai.APIConnectionError):
        return (
            f"Cannot reach the API at {api_base}. Is the server running (`minimind serve`)? Check the API base URL "
            "in the sidebar or MINIMIND_API_BASE (it ends with /v1)."
        )
    if isinstance(exc, openai.NotFoundError):
        return (
            f"The API at {api_base} answered 404: {_server_message(exc)}. Check the base URL (it ends with /v1) "
            "and the model name."
        )
    if isinstance(exc, openai.APIStatusError):
        return f"The API answered {exc.status_code}: {_server_message(exc)}"
    if isinstance(exc, openai.APIError) or _is_transport_error(exc):
        return (
            f"The answer stream broke off ({type(exc).__name__}: {exc}). The part received is kept; "
            "press Regenerate to try again."
        )
    return f"Unexpected error talking to the API ({type(exc).__name__}: {exc})."


def _is_transport_error(exc: BaseException) -> bool:
    """A connection or stream error raised by the SDK's HTTP library while an answer streams.

    Matched by module because the SDK changed libraries between releases (openai 1.x streams through
    httpx, 3.x through httpx2): the page must name a broken stream the same way whichever one is installed.
    """
    return type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "httpcore2"}


def _server_message(exc: openai.APIStatusError) -> str:
    """The `error.message` of an OpenAI-shaped error body, else the SDK's own message."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(exc.message)
