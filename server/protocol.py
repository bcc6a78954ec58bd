"""Pydantic models of the OpenAI wire format (requests, responses, stream chunks), and nothing else.

Requests ignore unknown fields (clients such as Open-WebUI send their own), never reject them. Field
names follow OpenAI's API, plus vLLM's extensions (top_k, min_p, repetition_penalty, ...) under vLLM's names.
Every text in a request must be encodable as UTF-8: JSON may carry a lone surrogate (`"\\ud800"`), which no
tokenizer or response can hold, so it is refused here with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def random_id(prefix: str) -> str:
    """OpenAI-style ids: `chatcmpl-…`, `cmpl-…`, `call_…`."""
    return f"{prefix}{uuid.uuid4().hex}"


def _unencodable(value: Any, where: str = "") -> tuple[str, int, str] | None:
    """(where, character index, the character) of the first text in `value` that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return where, err.start, f"U+{ord(value[err.start]):04X}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable(key, f"{where}[key]") or _unencodable(item, f"{where}[{key!r}]")
            if found:
                return found
    elif isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        # typed fields hold lists of one kind (token ids are skipped whole); free-form dicts are walked above
        for i, item in enumerate(value):
            found = _unencodable(item, f"{where}[{i}]")
            if found:
                return found
    return None


class Request(BaseModel):
    """Base of every request: unknown fields are ignored (not rejected); text must be valid Unicode."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        found = _unencodable(value)
        if found is not None:
            where, index, char = found
            raise ValueError(
                f"text{where} has an unpaired UTF-16 surrogate ({char}) at character {index}, which is not valid "
                "Unicode; send UTF-8 text (a surrogate escape only as part of a complete pair)"
            )
        return value


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- shared request pieces -----------------------------------------------------------------------------


class StreamOptions(Request):
    include_usage: bool = False


class JsonSchemaFormat(Request):
    """`response_format.json_schema`: the schema the reply must validate against (server/structured.py)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    type: str = "text"  # text | json_object | json_schema; others get a 400 naming the supported ones
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(Request):
    """Fields that /v1/chat/completions and /v1/completions share; mapped 1:1 onto engine SamplingParams."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    # vLLM's structured-outputs fields: {"json"|"regex"|"choice"|"grammar"|"json_object": ...}, and the older
    # guided_* names
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None


# --- chat ----------------------------------------------------------------------------------------------


class ImageURL(Request):
    url: str
    detail: str | None = None


class ContentPart(Request):
    type: str = "text"
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(Request):
    name: str
    arguments: str = "{}"


class ToolCall(Request):
    id: str = Field(default_factory=lambda: random_id("call_"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # refused unless --trust-request-chat-template
    add_generation_prompt: bool = True


class ChatLogprobEntry(Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(ChatLogprobEntry):
    top_logprobs: list[ChatLogprobEntry] = Field(default_factory=list)


class ChatLogprobs(Response):
    content: list[ChatLogprobContent] | None = None


class ResponseMessage(Response):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(Response):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Usage(Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


# --- legacy completions ------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class CompletionLogprobs(Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- embeddings, models, tokenizer, errors -------------------------------------------------------------


class EmbeddingRequest(Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minimind"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # refused unless --trust-request-chat-template


class TokenizeResponse(Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(Response):
    prompt: str


class ErrorBody(Response):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(Response):
    error: ErrorBody
