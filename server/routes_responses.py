"""POST /v1/responses (OpenAI's Responses API, as vLLM serves it), GET and DELETE /v1/responses/{id}.

A request is rendered through the chat template like a chat completion; its output is the Responses form:
a `reasoning` item (text in `<think>`), a `message` item, `function_call` items. `previous_response_id`
continues a stored response (see server/responses_store.py). Streams send the SDK's typed events
(`event: response.output_text.delta` …), ending with response.completed or response.incomplete.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from engine.backend import CompletionDelta
from engine.reasoning import ReasoningStreamParser, reasoning_opened_by_prompt
from server.errors import APIError, api_error_from
from server.params import check_model, resolve_max_tokens, sampling_params
from server.prompts import chat_prompt
from server.protocol import ChatMessage, SamplingFields, random_id
from server.responses_protocol import (
    ResponsesRequest,
    chat_tools,
    check_supported,
    function_call_item,
    input_messages,
    message_item,
    output_messages,
    output_text_part,
    reasoning_item,
    response_object,
    usage_object,
)
from server.responses_store import ResponseStore, StoredResponse
from server.routes_chat import ChoiceState
from server.streaming import first_then_rest, run_backend, until_disconnect
from server.tool_calls import ToolCallStreamParser
from server.workers import offload

router = APIRouter(tags=["responses"])


def _conversation(body: ResponsesRequest, store: ResponseStore) -> list[ChatMessage]:
    """The stored conversation of previous_response_id (if any) followed by this request's input."""
    earlier: list[ChatMessage] = []
    if body.previous_response_id:
        stored = store.get(body.previous_response_id)
        if stored is None:
            raise APIError(
                404,
                f"previous response '{body.previous_response_id}' not found: responses are kept in memory (the "
                f"newest {store.capacity}, with store=true) until the server restarts; send the whole input instead",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        earlier = [message.model_copy(deep=True) for message in stored.conversation]
    conversation = [*earlier, *input_messages(body.input)]
    if not conversation:
        raise APIError(400, "input is empty: send a string or a list of input items", param="input")
    return conversation


def _thinking(body: ResponsesRequest) -> dict[str, Any] | None:
    """reasoning.effort switches the chat template's thinking on or off ('none' = off); absent = the default."""
    effort = (body.reasoning or {}).get("effort")
    if effort is None:
        return None
    on = effort != "none"
    return {"enable_thinking": on, "open_thinking": on}


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    backend = request.app.state.backend
    info = backend.info
    check_model(body.model, backend)
    check_supported(body)
    tools = chat_tools(body.tools)
    use_tools = bool(tools) and body.tool_choice != "none"
    store: ResponseStore = request.app.state.responses
    conversation = _conversation(body, store)
    system = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    prompt_text, prompt = await offload(  # off the event loop, as every chat template (server/workers.py)
        request,
        chat_prompt,
        backend.tokenizer,
        [*system, *conversation],
        tools=tools if use_tools else None,
        chat_template_kwargs=_thinking(body),
    )
    max_tokens = resolve_max_tokens(len(prompt), body.max_output_tokens, info.max_model_len, "max_output_tokens")
    fields = SamplingFields(temperature=body.temperature, top_p=body.top_p)
    params = sampling_params(fields, max_tokens=max_tokens, vocab_size=info.vocab_size)

    job = Job(body, random_id("resp_"), info.name, len(prompt), conversation, store)
    job.state = ChoiceState(
        ReasoningStreamParser(reasoning_opened_by_prompt(prompt_text)), ToolCallStreamParser() if use_tools else None
    )
    stream = run_backend(request, prompt, params, job.response_id)
    if body.stream:
        deltas = await first_then_rest(stream)
        return _sse(job.events(deltas))
    return JSONResponse(await until_disconnect(request, job.collect(stream)))


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> Any:
    stored = request.app.state.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"response '{response_id}' not found (or no longer kept)", param="response_id")
    return stored.response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> Any:
    if not request.app.state.responses.delete(response_id):
        raise APIError(404, f"response '{response_id}' not found (or no longer kept)", param="response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _sse(events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """`event: TYPE` + `data: {json}` per event, as OpenAI streams responses (no [DONE] at the end)."""

    async def frames() -> AsyncIterator[dict[str, str]]:
        async for event in events:
            yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False, separators=(",", ":"))}

    return EventSourceResponse(frames(), sep="\n", ping=15)


class Job:
    """One response in the making: folds engine deltas into output items, and stores the finished response."""

    def __init__(
        self,
        body: ResponsesRequest,
        response_id: str,
        model: str,
        num_prompt: int,
        conversation: list[ChatMessage],
        store: ResponseStore,
    ) -> None:
        self.body, self.response_id, self.model, self.num_prompt = body, response_id, model, num_prompt
        self.conversation, self.store = conversation, store
        self.state: ChoiceState
        self.created_at = int(time.time())
        self.sequence = 0

    def response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return response_object(
            self.body,
            response_id=self.response_id,
            model=self.model,
            created_at=self.created_at,
            status=status,
            output=output,
            **extra,
        )

    def finish(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        """The final Response object; kept in the store unless the request said store=false."""
        state = self.state
        status = "incomplete" if (state.finish_reason or "length") == "length" else "completed"
        usage = usage_object(self.num_prompt, state.generated)
        final = self.response(status, output, usage=usage)
        if self.body.store:
            self.store.put(StoredResponse(final, [*self.conversation, *output_messages(output)]))
        return final

    def final_items(self) -> list[dict[str, Any]]:
        state = self.state
        status = "incomplete" if (state.finish_reason or "length") == "length" else "completed"
        output = []
        if state.reasoning_text:
            output.append(reasoning_item(state.reasoning_text))
        if state.content_text or not state.tool_calls:
            output.append(message_item(state.content_text, status))
        output += [function_call_item(call) for call in state.tool_calls]
        return output

    async def collect(self, stream: AsyncIterator[CompletionDelta]) -> dict[str, Any]:
        async for delta in stream:
            self.state.feed(delta, None)
        return self.finish(self.final_items())

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    async def events(self, stream: AsyncIterator[CompletionDelta]) -> AsyncIterator[dict[str, Any]]:
        """The typed event stream: created, in_progress, items opened/streamed/closed, then the final event."""
        yield self.event("response.created", response=self.response("in_progress", []))
        yield self.event("response.in_progress", response=self.response("in_progress", []))
        items = ItemStream(self)
        try:
            async for delta in stream:
                reasoning, content, _ = self.state.feed(delta, None)
                for event in items.add(reasoning, content):
                    yield event
        except Exception as exc:  # the engine failed midway: the stream ends with response.failed
            err = api_error_from(exc)
            error = {"code": "server_error", "message": err.message}
            yield self.event("response.failed", response=self.response("failed", items.output, error=error))
            return
        for event in items.close_all(self.state):
            yield event
        final = self.finish(items.output)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield self.event(kind, response=final)


class ItemStream:
    """The output items of a streamed response: at most one open at a time (reasoning, then message)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.text = ""

    def _start(self, item: dict[str, Any], part: dict[str, Any]) -> list[dict[str, Any]]:
        self.open, self.text = item, ""
        self.output.append(item)
        index = len(self.output) - 1
        return [
            self.job.event("response.output_item.added", output_index=index, item=dict(item, content=[])),
            self.job.event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            ),
        ]

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        item, index, text = self.open, len(self.output) - 1, self.text
        if item is None:
            return []
        self.open = None
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            done = [self.job.event("response.reasoning_text.done", text=text, **where)]
            self.output[index] = reasoning_item(text, item["id"])
        else:
            part = output_text_part(text)
            done = [self.job.event("response.output_text.done", text=text, logprobs=[], **where)]
            self.output[index] = message_item(text, status, item["id"])
        done.append(self.job.event("response.content_part.done", part=part, **where))
        done.append(self.job.event("response.output_item.done", output_index=index, item=self.output[index]))
        return done

    def add(self, reasoning: str, content: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for kind, text in (("reasoning", reasoning), ("message", content)):
            if not text:
                continue
            if self.open is None or self.open["type"] != kind:
                events += self._close()
                if kind == "reasoning":
                    events += self._start(
                        reasoning_item("", status="in_progress"), {"type": "reasoning_text", "text": ""}
                    )
                else:
                    events += self._start(message_item("", "in_progress"), output_text_part(""))
            self.text += text
            where = {"item_id": self.open["id"], "output_index": len(self.output) - 1, "content_index": 0}
            if kind == "reasoning":
                events.append(self.job.event("response.reasoning_text.delta", delta=text, **where))
            else:
                events.append(self.job.event("response.output_text.delta", delta=text, logprobs=[], **where))
        return events

    def close_all(self, state: ChoiceState) -> list[dict[str, Any]]:
        """Close the open item, add an (empty) message if nothing was said, then the function calls."""
        status = "incomplete" if (state.finish_reason or "length") == "length" else "completed"
        events = self._close(status)
        if not any(item["type"] == "message" for item in self.output) and not state.tool_calls:
            events += self._start(message_item("", "in_progress"), output_text_part(""))
            events += self._close(status)
        for call in state.tool_calls:
            item = function_call_item(call)
            self.output.append(item)
            index = len(self.output) - 1
            where = {"item_id": item["id"], "output_index": index}
            events += [
                self.job.event(
                    "response.output_item.added",
                    output_index=index,
                    item=dict(item, arguments="", status="in_progress"),
                ),
                self.job.event("response.function_call_arguments.delta", delta=item["arguments"], **where),
                self.job.event(
                    "response.function_call_arguments.done", arguments=item["arguments"], name=item["name"], **where
                ),
                self.job.event("response.output_item.done", output_index=index, item=item),
            ]
        return events
