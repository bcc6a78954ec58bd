"""A request's structured-outputs fields → the engine's `StructuredOutputsParams` (both backends take it).

Accepted, as in vLLM's server: `response_format` {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}, vLLM's `structured_outputs` object and its older `guided_json`,
`guided_regex`, `guided_choice` fields, and (chat) `tool_choice` "required" or a named function, which forces a
call in the server's tool-call format. At most one of them per request; a malformed schema, regex or grammar is
a 400 naming the field and what the grammar compiler found wrong.
"""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidRequestError
from engine.structured import StructuredOutputsParams
from server.errors import APIError
from server.protocol import SamplingFields
from server.tool_calls import tool_call_grammar

FIELDS = ("json", "regex", "choice", "grammar", "json_object")


def _from_response_format(req: SamplingFields) -> StructuredOutputsParams | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(
                400,
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                param="response_format",
            )
        return StructuredOutputsParams(json=fmt.json_schema.json_schema)
    raise APIError(
        400,
        f"response_format type {fmt.type!r} is not supported; use 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )


def _from_vllm_fields(req: SamplingFields) -> list[tuple[str, StructuredOutputsParams]]:
    found = []
    if req.structured_outputs is not None:
        unknown = sorted(set(req.structured_outputs) - set(FIELDS))
        if unknown:
            raise APIError(
                400,
                f"structured_outputs: unsupported field(s) {unknown}; this server takes {list(FIELDS)}",
                param="structured_outputs",
            )
        found.append(("structured_outputs", StructuredOutputsParams(**req.structured_outputs)))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
        value = getattr(req, name)
        if value is not None:
            found.append((name, StructuredOutputsParams(**{kind: value})))
    return found


def structured_outputs(
    req: SamplingFields, tools: list | None = None, tool_choice: Any = None, tokenizer: Any = None
) -> StructuredOutputsParams | None:
    """The request's one output constraint, checked (compiled once), or None for free text. The tokenizer
    spells the tool-call tags in a forced call."""
    found = _from_vllm_fields(req)
    from_format = _from_response_format(req)
    if from_format is not None:
        found.append(("response_format", from_format))
    grammar = tool_call_grammar(tools or [], tool_choice, tokenizer)
    if grammar is not None:
        found.append(("tool_choice", StructuredOutputsParams(grammar=grammar)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"a request takes one output constraint, got {names}", param=found[1][0])
    param, constraint = found[0]
    try:
        constraint.validate()
    except InvalidRequestError as err:
        raise APIError(400, f"{param}: {err}", param=param) from None
    return constraint
