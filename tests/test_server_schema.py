"""schemathesis against the live server's OpenAPI document: whatever it sends, the answer is never a 5xx.

Bounded: a dozen generated requests per operation (derandomized, so CI runs are repeatable), on the
one-slot server (429s are fine, crashes are not). Cases are drawn through schemathesis' hypothesis
strategies directly rather than its pytest plugin, which does not support this pytest version.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.test_server_support import tight_server

EXAMPLES_PER_OPERATION = 12


def test_no_request_makes_the_server_fail():
    schema = schemathesis.openapi.from_url(tight_server().url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
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
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.body!r} -> {response.status_code}: {response.text[:300]}"
                )
            elif response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert not failures, "\n".join(failures[:10])
