"""The live server against its own OpenAPI document: schemathesis generates requests for every operation and
checks that each answer is documented (status code, content type, headers) and matches its schema, besides
never being a 5xx.

Bounded: a dozen generated requests per operation (derandomized, so CI runs are repeatable), on the
one-slot server (429s are fine, crashes are not). Cases are drawn through schemathesis' hypothesis
strategies directly rather than its pytest plugin, which does not support this pytest version.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.failures import FailureGroup

from tests.test_server_support import MODEL_NAME, tight_server

EXAMPLES_PER_OPERATION = 12
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
V1_POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def test_every_answer_conforms_to_the_openapi_document():
    schema = schemathesis.openapi.from_url(tight_server().url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= set(V1_POSTS)
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case) -> None:
            response = case.call(timeout=120)
            try:
                case.validate_response(response, checks=CHECKS)
            except (AssertionError, FailureGroup) as err:  # collected, so that one run reports them all
                details = "; ".join(str(e) for e in getattr(err, "exceptions", [err]))
                failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code}: {details}")
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert not failures, "\n\n".join(failures[:10])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_streamed_answer_conforms_to_the_document(path):
    """The generated cases above rarely get a streamed 200 (most are 400 or 429 on the one-slot server), so one is
    sent here: each server-sent event must match what the document says an event is."""
    schema = schemathesis.openapi.from_url(tight_server().url + "/openapi.json")
    operation = schema[path]["POST"]
    body = {"model": MODEL_NAME, "max_tokens": 3, "stream": True}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    case = operation.Case(body=body, media_type="application/json")
    response = case.call(timeout=120)
    assert response.status_code == 200 and response.headers["content-type"][0].startswith("text/event-stream")
    case.validate_response(response, checks=CHECKS)


def test_the_document_lists_the_errors_the_server_sends_and_no_422():
    document = httpx.get(tight_server().url + "/openapi.json").json()
    assert '"422"' not in str(document).replace("'", '"')
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path in V1_POSTS:
        responses = document["paths"][path]["post"]["responses"]
        assert {"400", "401", "404", "413", "503"} <= set(responses)
        for status in ("400", "413", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():  # a new route must say how it fails, too
        for method, operation in operations.items():
            if path not in ("/health", "/metrics"):
                assert "503" in operation["responses"], f"{method.upper()} {path}: its error statuses are undocumented"
    assert "429" in document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "text/event-stream" in document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(document["components"]["schemas"]["ErrorBody"]["required"]) >= {"message", "type"}
