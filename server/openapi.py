"""/openapi.json as the server really answers: every error status it sends, in OpenAI's error shape, and no 422.

FastAPI documents a 422 with its own body on every route that takes input; this server answers invalid input
with 400 instead (server/errors.py), so the 422 is replaced by the statuses below. Streams are documented as
`text/event-stream` next to the JSON answer, /metrics as Prometheus text.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.protocol import ErrorResponse

# One server-sent event, as SSE clients (and OpenAPI 3.2 tools) read a stream: an object per event, not the raw text.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "one server-sent event: `data` holds a JSON chunk; the last event's `data` is `[DONE]`",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}

WHEN = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range (`param` names it), "
    "a prompt over the context, a request that can never fit the queue",
    401: "Missing or wrong API key",
    404: "Unknown model (`param: model`), or an unknown or expired response id",
    413: "Request body over --max-request-bytes",
    429: "The waiting queue is full (--max-queue); retry after `Retry-After` seconds",
    503: "The server is shutting down (or stopped before this request finished); retry elsewhere",
}
GENERATE = (400, 401, 404, 413, 429, 503)
# (path, method) -> error statuses the route can answer with
ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("/v1/chat/completions", "post"): GENERATE,
    ("/v1/completions", "post"): GENERATE,
    ("/v1/embeddings", "post"): (400, 401, 404, 413, 503),
    ("/v1/models", "get"): (401, 503),
    ("/v1/models/{model_id}", "get"): (401, 404, 503),
    ("/tokenize", "post"): (400, 404, 413, 503),
    ("/detokenize", "post"): (400, 404, 413, 503),
    ("/v1/responses", "post"): GENERATE,
    ("/v1/responses/{response_id}", "get"): (401, 404, 503),
    ("/v1/responses/{response_id}", "delete"): (401, 404, 503),
    ("/tokenizer_info", "get"): (503,),
}
STREAMING = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
HEALTH_SCHEMA = {
    "type": "object",
    "properties": {"status": {"type": "string", "enum": ["ok", "starting", "draining"]}},
    "required": ["status"],
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": WHEN[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    if status in (429, 503):
        response["headers"] = RETRY_AFTER
    return response


def fix_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's generated document with the responses this server really sends."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in ERRORS.get((path, method), ()):
                responses[str(status)] = _error_response(status)
            if path in STREAMING:
                content = responses["200"].setdefault("content", {})
                content["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}
    health = schema["paths"]["/health"]["get"]["responses"]
    health["200"] = {"description": "Serving", "content": {"application/json": {"schema": HEALTH_SCHEMA}}}
    health["503"] = {
        "description": "Starting, or shutting down",
        "content": {"application/json": {"schema": HEALTH_SCHEMA}},
    }
    schema["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus metrics",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return schema


def install_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = fix_schema(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
