"""GET /tokenizer_info (vLLM's extension): the served tokenizer's configuration, special tokens and chat template.

lm-evaluation-harness probes it (with /tokenize) and, when both answer, tokenizes through the server: then
`local-completions` needs no tokenizer argument and nothing from the Hugging Face Hub. Open like /tokenize.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

router = APIRouter(tags=["tokenizer"])

# init_kwargs entries that are paths on the server's disk, not configuration
_PATHS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _plain(value: Any) -> Any:
    """JSON-ready copy: AddedToken → its text, dict keys → str, anything unknown → str."""
    if hasattr(value, "content") and isinstance(value.content, str):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """What vLLM's /tokenizer_info returns: the tokenizer's init kwargs, its class and its chat template."""
    info = {k: _plain(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items() if k not in _PATHS}
    for name in _SPECIAL:  # the loaded tokenizer's own values win over what its config file said
        token = getattr(tokenizer, name, None)
        if token is not None or name not in info:
            info[name] = _plain(token)
    info["tokenizer_class"] = type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        info["chat_template"] = template
    return info


@router.get("/tokenizer_info")
async def get_tokenizer_info(request: Request) -> dict[str, Any]:
    return tokenizer_info(request.app.state.backend.tokenizer)
