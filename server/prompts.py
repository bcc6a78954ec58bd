"""Prompts → token ids: chat messages through the tokenizer's chat template, and plain prompt strings.

Shared by /v1/chat/completions, /v1/completions, /v1/embeddings and /tokenize, so each turns text into
tokens the same way (vLLM's rules: chat prompts without extra special tokens, plain prompts with them).
The functions here are plain and blocking: routes run them in the worker pool (server/workers.py).

A chat template sent in a request is a Jinja program that runs on this server; like vLLM, the server runs
one only when started with --trust-request-chat-template.
"""

from __future__ import annotations

from typing import Any

from server.errors import APIError
from server.protocol import ChatMessage, Tool

# chat_template_kwargs may not override the arguments the server itself passes
_RESERVED = {
    "conversation",
    "tools",
    "add_generation_prompt",
    "tokenize",
    "return_dict",
    "continue_final_message",
    "chat_template",
}


def request_template(
    chat_template: str | None, chat_template_kwargs: dict[str, Any] | None, trusted: bool
) -> str | None:
    """The template a request brings (its `chat_template`, or `chat_template` in chat_template_kwargs), if any;
    400 unless the server trusts request templates."""
    kwargs_template = (chat_template_kwargs or {}).get("chat_template")
    template = chat_template if chat_template is not None else kwargs_template
    if template is None:
        return None
    param = "chat_template" if chat_template is not None else "chat_template_kwargs.chat_template"
    if not trusted:
        raise APIError(
            400,
            f"{param}: this server does not run chat templates sent in requests (a template is a program); "
            "leave the field out to use the model's own template, or start the server with "
            "--trust-request-chat-template (MINIMIND_TRUST_REQUEST_CHAT_TEMPLATE=1)",
            param=param,
        )
    if not isinstance(template, str):
        raise APIError(400, f"{param} must be a string (a Jinja template)", param=param)
    return template


def message_dict(message: ChatMessage, image_text: str | None = None) -> dict[str, Any]:
    """A message as chat templates expect it; content-part arrays become their parts joined by newlines, an image
    part becoming `image_text` (a VLM's placeholder run). Without `image_text` an image part is a 400, never
    silently dropped."""
    content = message.content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if part.type == "image_url":
                if image_text is None:
                    raise APIError(
                        400,
                        "image_url content parts are read only by /v1/chat/completions of a vision-language model",
                        param="messages",
                    )
                pieces.append(image_text)
            elif part.type == "text" and part.text is not None:
                pieces.append(part.text)
        content = "\n".join(pieces)
    out: dict[str, Any] = {"role": message.role, "content": content if content is not None else ""}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    return out


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    tools: list[Tool] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    image_text: str | None = None,
) -> str:
    """The prompt text the chat template (the model's, or a trusted request's) makes of `messages` (400 if there
    is no template or it fails)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "this model's tokenizer has no chat template, so /v1/chat/completions cannot format messages; "
            "use /v1/completions with a plain prompt, or serve a model whose tokenizer_config.json has one",
            param="messages",
        )
    extra = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in _RESERVED}
    try:
        return tokenizer.apply_chat_template(
            [message_dict(m, image_text) for m in messages],
            tools=[tool.model_dump(exclude_none=True) for tool in tools] if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            chat_template=chat_template,
            **extra,
        )
    except APIError:
        raise
    except Exception as exc:  # jinja raise_exception(), bad roles, ... : the client's messages, not a crash
        raise APIError(400, f"the chat template could not format these messages: {exc}", param="messages") from None


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of `text`. A fast tokenizer's `encode_batch_fast` gives the same ids as calling the tokenizer,
    but releases the GIL while it works and builds no offsets: on a 5 MB text 1.8 s instead of 6 s, and the
    event loop is never held for more than about 50 ms (freeing a full encoding alone held it for 0.3 s)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], **render_kwargs: Any) -> tuple[str, list[int]]:
    """render_chat, then its token ids (chat prompts carry their special tokens in the text already)."""
    text = render_chat(tokenizer, messages, **render_kwargs)
    return text, encode(tokenizer, text, add_special_tokens=False)


def normalize_prompts(prompt: Any, param: str = "prompt") -> list[str | list[int]]:
    """OpenAI's prompt/input forms (string, strings, token ids, lists of token ids) as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, f"{param} is empty: send a string, a list of strings or a list of token ids", param=param)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]
