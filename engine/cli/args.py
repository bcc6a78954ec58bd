"""Command-line flags shared by `minimind generate` and `minimind chat`: one definition of the model and engine
flags and of the sampling flags, and the functions that turn them into an `EngineConfig` and a `SamplingParams`."""

from __future__ import annotations

import argparse
from typing import Any

from engine.config import KV_CACHE_LAYOUTS, EngineConfig
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from minimind.sizes import byte_size
from models.dtypes import DTYPE_CHOICES, DTYPE_HELP
from models.quantization import QUANTIZATION_CHOICES

# SamplingParams field -> flag name, to point error messages at the flag the user typed.
_FLAG_OF = {
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "max_tokens": "--max-tokens",
    "min_tokens": "--min-tokens",
    "n": "-n",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --lora, --draft-model, --num-speculative-tokens, --device, --dtype, --max-model-len,
    --quantization, --compile, and the engine's capacity flags (--max-num-seqs, --max-prefill-tokens,
    --kv-cache-memory, --kv-cache, --enable-prefix-caching, --no-cuda-graphs)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="checkpoint to load: a Hugging Face directory (MiniMind, Llama, Qwen2/3, Qwen MoE), an upstream "
        "MiniMind .pth file or a .gguf file; omitted: the bundled SmolLM2-135M-Instruct model",
    )
    group.add_argument(
        "--tokenizer", default=None, help="tokenizer directory, when it is not beside the checkpoint (e.g. for a .pth)"
    )
    group.add_argument(
        "--lora", default=None, help="LoRA adapter directory (PEFT format) merged into the model at load"
    )
    group.add_argument(
        "--draft-model",
        default=None,
        help="a smaller model with the same tokenizer that proposes tokens for speculative decoding "
        "(faster, same output distribution)",
    )
    group.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=4,
        help="tokens the draft model proposes per step when --draft-model is set (default: 4)",
    )
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    group.add_argument(
        "--dtype",
        default=None,
        type=str.lower,
        choices=DTYPE_CHOICES,
        metavar="DTYPE",
        help=f"weight precision: {DTYPE_HELP} (default: bf16 on GPU, float32 on CPU)",
    )
    group.add_argument(
        "--max-model-len", type=int, default=None, help="context window in tokens, prompt + output (default: model's)"
    )
    group.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATION_CHOICES,
        help="CPU: store the linear layers' weights in 8 or 4 bits (weight-only, per-channel int8 or llama.cpp's "
        "Q4_0 scheme): faster decoding, slightly different outputs (default: none)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="GPU: run decode steps through torch.compile (about 2x faster at small batch sizes; the first "
        "decode step waits 30-60 s while it compiles)",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max-num-seqs",
        type=int,
        default=EngineConfig.max_num_seqs,
        help=f"most sequences decoded together, e.g. the -n completions (default: {EngineConfig.max_num_seqs})",
    )
    engine.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=EngineConfig.max_prefill_tokens,
        help="most prompt tokens computed in one prefill step (vLLM's --max-num-batched-tokens); a longer prompt "
        "is prefilled in chunks of this size, with a decode step of the running sequences between chunks "
        f"(default: {EngineConfig.max_prefill_tokens})",
    )
    engine.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="memory for the KV cache (bytes, or e.g. 2GiB); it bounds how many sequences run at once "
        "(default: half the free GPU memory, or 2GiB on the CPU)",
    )
    engine.add_argument(
        "--kv-cache",
        choices=KV_CACHE_LAYOUTS,
        default=EngineConfig.kv_cache,
        help="KV cache layout: contiguous (one max-model-len slot per sequence) or paged (16-token blocks taken as "
        "tokens arrive, so memory bounds tokens rather than sequences, with prefix caching) "
        f"(default: {EngineConfig.kv_cache})",
    )
    engine.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=EngineConfig.enable_prefix_caching,
        help="with --kv-cache paged: prompts that start like an earlier one (system prompt, re-sent chat history) "
        "reuse its cached blocks instead of computing them again (default: on)",
    )
    engine.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPU: replay decode steps as CUDA graphs; --no-cuda-graphs runs them eagerly, for debugging (default: on)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The one mapping of these flags to engine fields (same names, but --compile and --dtype auto)."""
    config = EngineConfig.from_fields(
        vars(args),
        dtype=None if args.dtype in (None, "auto") else args.dtype,
        compile_model=getattr(args, "compile", False),
    )
    try:
        config.validate()
    except InvalidRequestError as err:
        raise InvalidRequestError(f"--{err.param.replace('_', '-')}: {err}", param=err.param) from None
    return config


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """The sampling flags; their meaning is that of vLLM's/OpenAI's parameters of the same name."""
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="randomness: 0 always picks the most likely token (greedy), higher is more varied (default: 0.7)",
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=0.9,
        help="sample only from the most likely tokens whose probabilities add up to this (default: 0.9; 1 = off)",
    )
    group.add_argument(
        "--top-k", type=int, default=0, help="sample only from the K most likely tokens (default: 0 = off)"
    )
    group.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens less likely than this fraction of the most likely one (default: 0 = off)",
    )
    group.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="above 1 discourages repeating tokens already in the prompt or answer (default: 1.0 = off)",
    )
    group.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="-2..2: positive values discourage any token the answer already used (default: 0)",
    )
    group.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="-2..2: positive values discourage tokens in proportion to how often the answer used them (default: 0)",
    )
    group.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate (default: {max_tokens})"
    )
    group.add_argument(
        "--min-tokens", type=int, default=0, help="generate at least this many tokens before stopping (default: 0)"
    )
    group.add_argument(
        "--seed", type=int, default=None, help="random seed: the same seed and settings give the same output"
    )
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (not shown); repeat the flag for several stop strings",
    )
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-text token, up to --max-tokens (for benchmarks)",
    )


def sampling_params_from_args(args: argparse.Namespace, **overrides: Any) -> SamplingParams:
    """A SamplingParams from the flags of `add_sampling_arguments`; a bad value names its flag."""
    fields = dict(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        seed=args.seed,
        stop=list(args.stop),
        ignore_eos=args.ignore_eos,
    )
    fields.update(overrides)
    try:
        return SamplingParams(**fields)
    except InvalidRequestError as err:
        flag = _FLAG_OF.get(err.param or "")
        if flag is None:
            raise
        raise InvalidRequestError(f"{flag}: {err}", param=err.param) from None


def add_thinking_arguments(parser: argparse.ArgumentParser) -> None:
    """--thinking / --no-thinking: whether a thinking model reasons before answering (chat template switch)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--thinking",
        dest="thinking",
        action="store_const",
        const=True,
        default=None,
        help="ask a thinking model to reason (in <think>...</think>) before it answers",
    )
    group.add_argument(
        "--no-thinking",
        dest="thinking",
        action="store_const",
        const=False,
        help="ask a thinking model to answer directly, without reasoning",
    )


def chat_template_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """Chat template switches for --thinking/--no-thinking; None leaves the template's default. Qwen3-style
    templates read `enable_thinking`, MiniMind3's reads `open_thinking`; each ignores the other."""
    if args.thinking is None:
        return None
    return {"enable_thinking": args.thinking, "open_thinking": args.thinking}
