"""API keys: `/v1/*` needs `Authorization: Bearer KEY` when the server was started with --api-key.

/health, /metrics, /tokenize and /detokenize stay open so that probes and scrapers need no secret.
"""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import APIError


def check_api_key(request: Request) -> None:
    """FastAPI dependency for /v1 routes: 401 unless the request carries one of the configured keys."""
    keys: list[str] = request.app.state.settings.api_key
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        token = request.headers.get("x-api-key", "").strip()
    if not token:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    # compare_digest against every key so the time taken does not reveal which key nearly matched
    if not any(secrets.compare_digest(token.encode(), key.encode()) for key in keys):
        raise APIError(
            401, "invalid API key: use one of the keys the server was started with (--api-key)", code="invalid_api_key"
        )
