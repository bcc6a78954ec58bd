"""`load_model(source)`: any checkpoint kind -> (our MiniMindForCausalLM, tokenizer). The engine, the CLI and
conversion all load through here, so there is one place that knows checkpoint formats.

Sources:
- a Hugging Face directory of model_type minimind, llama, qwen2, qwen3, qwen2_moe or qwen3_moe;
- an upstream MiniMind `.pth` state_dict, shaped by `preset=` and/or `config=` (a config.json; one next to
  the file is used when neither is given); q/k norm and tied embeddings are read from the weights;
- a `.gguf` file, read and dequantised by transformers (`gguf_file=`), then translated like a HF model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.checkpoint import (
    HF_MODEL_TYPES,
    check_config_fits_weights,
    check_state_dict,
    minimind_config_from_hf,
    read_json,
    read_safetensors_dir,
    read_torch_file,
    state_dict_from_hf,
)
from models.config import MiniMindConfig, field_error
from models.dtypes import dtype_name
from models.errors import CheckpointError
from models.model import MiniMindForCausalLM

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The shape fields a Hugging Face config.json must name (every real one does).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# Upstream MiniMind config.json names that differ from ours (minimind-3 took Qwen3-MoE's names).
_UPSTREAM_RENAMES = {"num_experts": "n_routed_experts", "router_aux_loss_coef": "aux_loss_alpha"}
# What upstream's `inference_rope_scaling=True` switches on (its YaRN setting for 4x longer contexts).
_UPSTREAM_YARN = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 2048,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """A torch dtype from a name ("bf16", "float16", ...); None means: the checkpoint's own (fp32 on CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        name = "auto" if dtype is None else dtype_name(dtype)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else None
    return DTYPES[name]


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    lora: str | Path | None = None,
    vision_encoder: str | Path | None = None,
) -> tuple[MiniMindForCausalLM, Any]:
    """Load any supported checkpoint as our model (eval mode) plus its tokenizer.

    dtype None keeps the checkpoint's floating dtype on GPU and uses float32 on CPU. The tokenizer comes from
    `tokenizer=` or from beside the source; `lora=` is a PEFT adapter directory merged into the weights.
    """
    model_config, state, tok_dir, gguf = read_checkpoint(
        source, preset=preset, config=config, vision_encoder=vision_encoder
    )
    model = build_model(model_config, state, str(source))
    target = resolve_dtype(dtype, device) or stored_dtype(state)
    model = model.to(device=device, dtype=target).eval()
    if lora is not None:
        from models.lora import merge_lora_adapter

        model = merge_lora_adapter(model, lora)
    return model, load_tokenizer(tokenizer or tok_dir, gguf_file=None if tokenizer else gguf)


def read_checkpoint(
    source: str | Path,
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    vision_encoder: str | Path | None = None,
) -> tuple[MiniMindConfig, dict[str, torch.Tensor], Path, str | None]:
    """(config, state_dict in our layout, directory to look for a tokenizer in, gguf file name or None).

    A .pth with a vision encoder (`vision_encoder=` or `vision_encoder/` beside it, upstream minimind-v's
    layout) is read as a vision-language model (models/vision)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is not a model directory: no config.json (expected a Hugging Face directory, a .pth or a "
                ".gguf file)"
            )
        if preset or config:
            raise CheckpointError(f"{path}: --preset/--config apply to .pth files only; a directory has config.json")
        model_config, state = _read_hf_dir(path)
        return model_config, state, path, None
    if path.suffix == ".gguf" or _has_gguf_magic(path):
        model_config, state = _read_gguf(path)
        return model_config, state, path.parent, path.name
    model_config, state = _read_pth(path, preset=preset, config=config)
    model_config, state = _with_vision_encoder(path, model_config, state, config, vision_encoder)
    return model_config, state, path.parent, None


def _with_vision_encoder(
    path: Path,
    llm_config: MiniMindConfig,
    state: dict[str, torch.Tensor],
    config: str | Path | None,
    vision_encoder: str | Path | None,
) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """The VLM config and state when an encoder is given or found beside `path`; the LLM's otherwise."""
    from models.vision.checkpoint import UPSTREAM_VLM_TYPE, encoder_state, find_vision_encoder, vlm_config_from

    config_file = Path(config) if config else path.parent / "config.json"
    upstream = read_json(config_file) if config_file.is_file() else {}
    encoder_dir = find_vision_encoder(path, vision_encoder)
    has_projector = any(k.startswith("vision_proj.") for k in state)
    if encoder_dir is None:
        if has_projector or upstream.get("model_type") == UPSTREAM_VLM_TYPE:
            raise CheckpointError(
                f"{path}: a vision-language checkpoint, but no vision encoder: put its directory at "
                f"{path.parent / 'vision_encoder'} or pass --vision-encoder DIR"
            )
        return llm_config, state
    return vlm_config_from(llm_config, encoder_dir, upstream), {**state, **encoder_state(encoder_dir)}


def build_model(config: MiniMindConfig, state: dict[str, torch.Tensor], where: str) -> MiniMindForCausalLM:
    """Our model with exactly these weights; parameters start on the meta device so no random init is wasted
    (accelerate's init_empty_weights, not a meta device context: RoPE tables must still be computed)."""
    from accelerate import init_empty_weights

    check_config_fits_weights(config, state, where)
    model_class = MiniMindForCausalLM
    if config.model_type == "minimind_vlm":
        from models.vision import MiniMindVLMForCausalLM as model_class
    with init_empty_weights():
        model = model_class(config)
    state = check_state_dict(state, model.state_dict(), config, where)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_tokenizer(folder: str | Path, gguf_file: str | None = None) -> Any:
    """AutoTokenizer from a directory (or a GGUF file's embedded vocabulary); a clear error when there is none."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    if (
        gguf_file is None
        and not (folder / "tokenizer.json").exists()
        and not (folder / "tokenizer_config.json").exists()
    ):
        raise CheckpointError(
            f"{folder}: no tokenizer here (tokenizer.json / tokenizer_config.json); pass --tokenizer DIR"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    except Exception as err:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(err).__name__}: {err})") from err


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    return floats[0] if floats else torch.float32


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _read_hf_dir(folder: Path) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    from transformers import AutoConfig

    config_file = folder / "config.json"
    raw = read_json(config_file)
    model_type = raw.get("model_type")
    where = str(config_file)
    for field in REQUIRED_FIELDS:  # no silent defaults for the model's shape (transformers would take Llama-7B's)
        problem = f"field {field!r} is missing" if field not in raw else field_error(field, raw[field])
        if problem:
            raise CheckpointError(f"{where}: {problem}; set it to the model's value")
    if model_type in ("minimind", "minimind_vlm"):
        config_class = MiniMindConfig
        if model_type == "minimind_vlm":
            from models.vision import MiniMindVLMConfig as config_class
        try:
            model_config = config_class.from_dict(raw)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{where}: {err}") from err
    else:
        if model_type not in HF_MODEL_TYPES:
            raise CheckpointError(
                f"{where}: field 'model_type': {model_type!r} is not supported; supported: {', '.join(HF_MODEL_TYPES)}"
            )
        try:
            hf = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
        except Exception as err:  # transformers' own field validation: one line of it
            reason = " ".join(line.strip() for line in str(err).splitlines())
            raise CheckpointError(f"{where}: config cannot be used: {reason}") from None
        model_config = minimind_config_from_hf(hf, where)
    state = state_dict_from_hf(read_safetensors_dir(folder), model_config, str(folder))
    return model_config, state


def _read_gguf(path: Path) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """transformers reads the GGUF (dequantising to fp32) into its own model class; we take config and tensors."""
    from transformers import AutoModelForCausalLM

    overrides = _gguf_overrides(path)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **overrides
        )
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read this GGUF file ({type(err).__name__}: {err})") from err
    model_config = minimind_config_from_hf(hf_model.config, str(path))
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return model_config, state_dict_from_hf(state, model_config, str(path))


def _gguf_overrides(path: Path) -> dict[str, int]:
    """Config fields transformers does not read from a GGUF: a qwen3/qwen3moe file's attention.key_length (it
    assumes head_dim 128) and a qwen3moe file's expert_feed_forward_length (it assumes 768). A MoE file in
    llama.cpp's llama (Mixtral) layout is refused here: transformers would read it as a dense llama."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        names = ("attention.key_length", "expert_count", "expert_feed_forward_length")
        fields = {name: reader.fields.get(f"{arch}.{name}") for name in names}
    except Exception:  # an unreadable file is reported by the full read that follows
        return {}
    if arch == "llama" and fields["expert_count"] is not None and int(fields["expert_count"].contents()) > 0:
        raise CheckpointError(
            f"{path}: a MoE model in llama.cpp's llama (Mixtral) layout, which this loader does not read (it reads "
            "MoE GGUFs in the qwen3moe layout); load the checkpoint it was converted from instead"
        )
    out = {}
    if arch in ("qwen3", "qwen3moe") and fields["attention.key_length"] is not None:
        out["head_dim"] = int(fields["attention.key_length"].contents())
    if arch == "qwen3moe" and fields["expert_feed_forward_length"] is not None:
        out["moe_intermediate_size"] = int(fields["expert_feed_forward_length"].contents())
    return out


def _read_pth(
    path: Path, *, preset: str | None, config: str | Path | None
) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    state = read_torch_file(path)
    fields: dict[str, Any] = {}
    if preset:
        from models.presets import PRESETS

        if preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        fields.update(PRESETS[preset])
    config_file = Path(config) if config else None
    if config_file is None and not preset and (path.parent / "config.json").exists():
        config_file = path.parent / "config.json"
    if config_file is not None:
        fields.update(upstream_config_fields(read_json(config_file)))
    elif not preset:
        raise CheckpointError(
            f"{path}: a .pth file holds weights only; say which shape it has with --preset NAME or --config FILE"
        )
    # What the weights themselves say wins over a preset: q/k norm and tied embeddings.
    fields["qk_norm"] = any(k.endswith("self_attn.q_norm.weight") for k in state)
    head = state.get("lm_head.weight")
    embed = state.get("model.embed_tokens.weight")
    fields["tie_word_embeddings"] = head is None or (embed is not None and torch.equal(head, embed))
    if fields.get("use_moe"):  # upstream minimind-3 configs do not name it; the weights always tell
        shared = {k.split(".shared_experts.")[1].split(".")[0] for k in state if ".shared_experts." in k}
        fields["n_shared_experts"] = len(shared)
    where = str(config_file or path)
    try:
        model_config = MiniMindConfig(**fields)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: {err}") from err
    return model_config, state


def upstream_config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Upstream MiniMind config.json -> MiniMindConfig keyword arguments (known fields only)."""
    import inspect

    known = set(inspect.signature(MiniMindConfig.__init__).parameters) - {"self", "kwargs"}
    fields = {}
    for key, value in raw.items():
        key = _UPSTREAM_RENAMES.get(key, key)
        if key in known and value is not None:
            fields[key] = value
    if raw.get("inference_rope_scaling") and not raw.get("rope_scaling"):
        fields["rope_scaling"] = dict(_UPSTREAM_YARN)
    fields.pop("qk_norm", None)
    fields.pop("tie_word_embeddings", None)
    return fields
