"""Backends behind the server: `native` (this project's engine) and `vllm` (vLLM's AsyncLLM), one protocol.

Imported by name so that neither backend's heavy dependencies load unless it is used.
"""

from __future__ import annotations

from typing import Any


def create_backend(name: str, **kwargs: Any) -> Any:
    """Build the backend called `name` ("native" or "vllm") with its keyword arguments."""
    if name == "native":
        from engine.backends.native import NativeBackend

        return NativeBackend(**kwargs)
    if name == "vllm":
        from engine.backends.vllm import VllmBackend

        return VllmBackend(**kwargs)
    from engine.errors import InvalidRequestError

    raise InvalidRequestError(f"unknown backend {name!r}: use 'native' or 'vllm'", param="backend")
