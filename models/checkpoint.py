"""Reading checkpoints into MiniMind form: config translation and key renaming, with checks that name the file.

Every source kind (our HF directories, Llama/Qwen2/Qwen3/Qwen2-MoE/Qwen3-MoE directories, upstream `.pth`,
GGUF through transformers) ends here as a (MiniMindConfig, state_dict in our key layout) pair. Our key names
are already the Llama/Qwen names, so "conversion" is: translate the config, split fused expert tensors,
fold Qwen2-MoE's shared expert back into plain shared experts, and check every key and shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from models.config import MiniMindConfig
from models.errors import CheckpointError

HF_MODEL_TYPES = ("minimind", "llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError with the line and column of the syntax error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); fix the file there"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory (single file or shards); a clear error for missing or corrupt files."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files in this directory")
        return {k: v for f in bins for k, v in read_torch_file(f).items()}
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors file ({err}); is it truncated?") from err
    return state


def load_plain(path: Path) -> Any:
    """torch.load restricted to tensors, numbers, strings and containers (weights_only): loading cannot run code.

    torch's own refusal advises `weights_only=False`, i.e. running whatever the file holds; the error raised
    here says what the file is instead, on one line. Safe globals allowlisted by the caller
    (torch.serialization.safe_globals) still apply.
    """
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the restricted unpickler's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(_refusal(path, str(err))) from None
        raise CheckpointError(_unreadable(path, _first_sentence(err))) from None
    except EOFError:
        raise CheckpointError(_unreadable(path, "the file ends early")) from None
    except Exception as err:  # zip reader errors and the like
        raise CheckpointError(_unreadable(path, _first_sentence(err))) from None


def _unreadable(path: Path, reason: str) -> str:
    return f"{path}: not a readable PyTorch checkpoint ({reason}): truncated, or not written by torch.save"


def _refusal(path: Path, torch_message: str) -> str:
    found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", torch_message)))
    found += sorted(set(re.findall(r"but got <class '([\w.]+)'>", torch_message)))
    what = f"Python objects ({', '.join(found)})" if found else "pickle content other than tensors and containers"
    return (
        f"{path}: not a plain state dict: it holds {what}, and loading such content can run code, so the file is "
        "refused for safety (save weights as tensors only: torch.save(model.state_dict(), file), or .safetensors)"
    )


def _first_sentence(err: BaseException) -> str:
    """The exception's first sentence: torch's reader errors go on with paragraphs of advice."""
    lines = str(err).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict saved with torch.save (upstream `.pth`); weights_only so a file cannot run code."""
    data = load_plain(path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # training-resume files keep the weights under "model"
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensor names to tensors)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in data.items()}


def _config_error(where: str, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: field {field!r}: {problem}")


def minimind_config_from_hf(hf: Any, where: str) -> MiniMindConfig:
    """Translate a transformers config object (llama, qwen2, qwen3, qwen2_moe, qwen3_moe, minimind) to ours.

    Only what changes the function computed is translated; what our model cannot compute is refused here,
    naming the field, rather than silently producing a different model.
    """
    model_type = hf.model_type
    if model_type == "minimind":
        return MiniMindConfig(**hf.to_dict()) if not isinstance(hf, MiniMindConfig) else hf
    if model_type not in HF_MODEL_TYPES:
        raise _config_error(where, "model_type", f"{model_type!r} is not supported; supported: {HF_MODEL_TYPES}")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise _config_error(where, "hidden_act", f"{hf.hidden_act!r} is not supported (only silu / SwiGLU)")
    if getattr(hf, "mlp_bias", False):
        raise _config_error(where, "mlp_bias", "MLP biases are not supported")
    if getattr(hf, "use_sliding_window", False):
        raise _config_error(where, "use_sliding_window", "sliding-window attention is not supported")
    if model_type in ("llama", "qwen3", "qwen3_moe") and getattr(hf, "attention_bias", False):
        raise _config_error(where, "attention_bias", "an o_proj bias is not supported (only q/k/v biases)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kwargs: dict[str, Any] = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=hf.rope_parameters.get("rope_theta", 10000.0),
        rope_parameters=dict(hf.rope_parameters),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        attention_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and getattr(hf, "qkv_bias", True)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
    )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if getattr(hf, "mlp_only_layers", None) or getattr(hf, "decoder_sparse_step", 1) != 1:
            raise _config_error(where, "mlp_only_layers/decoder_sparse_step", "mixed dense/MoE layers not supported")
        top_k = hf.num_experts_per_tok
        if top_k == 1 and hf.norm_topk_prob:
            raise _config_error(
                where, "norm_topk_prob", "renormalising a single routed expert's weight (to 1.0) is not supported"
            )
        n_shared = 0
        if model_type == "qwen2_moe" and hf.shared_expert_intermediate_size:
            if hf.shared_expert_intermediate_size % hf.moe_intermediate_size:
                raise _config_error(
                    where,
                    "shared_expert_intermediate_size",
                    f"{hf.shared_expert_intermediate_size} is not a multiple of moe_intermediate_size "
                    f"{hf.moe_intermediate_size}",
                )
            n_shared = hf.shared_expert_intermediate_size // hf.moe_intermediate_size
        kwargs.update(
            use_moe=True,
            n_routed_experts=hf.num_experts,
            num_experts_per_tok=top_k,
            n_shared_experts=n_shared,
            moe_intermediate_size=hf.moe_intermediate_size,
            norm_topk_prob=bool(hf.norm_topk_prob) and top_k > 1,
            aux_loss_alpha=getattr(hf, "router_aux_loss_coef", 0.01),
        )
    try:
        return MiniMindConfig(**kwargs)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{where}: config cannot be used: {err}") from err


def state_dict_from_hf(state: dict[str, torch.Tensor], config: MiniMindConfig, where: str) -> dict[str, torch.Tensor]:
    """Rename a Llama/Qwen state_dict into ours: split fused experts, turn Qwen2-MoE's shared expert into ours.

    Qwen2-MoE computes sigmoid(shared_expert_gate(x)) * shared_expert(x). Our shared experts are ungated,
    which equals that exactly only when the gate weight is zero (sigmoid(0) = 0.5) and down_proj is halved
    back; anything else is refused.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("_orig_mod.")
        if key.endswith("rotary_emb.inv_freq"):
            continue
        fused = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", key)
        if fused:
            prefix, kind = fused.groups()
            for e in range(value.shape[0]):
                if kind == "gate_up_proj":
                    gate, up = value[e].chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = value[e].contiguous()
            continue
        if ".mlp.gate.weight" in key or ".mlp.router." in key:
            out[key.replace(".mlp.router.", ".mlp.gate.")] = value
            continue
        gated = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.shared_expert_gate\.weight", key)
        if gated:
            if value.abs().max().item() != 0:
                raise CheckpointError(
                    f"{where}: tensor {key}: Qwen2-MoE's sigmoid-gated shared expert with a non-zero gate cannot be "
                    "represented (only the zero gate that `minimind convert --to qwen2_moe` writes)"
                )
            continue
        shared = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight", key)
        if shared:
            prefix, proj = shared.groups()
            width = config.moe_intermediate_size
            if config.n_shared_experts == 0 and value.numel() == 0:
                continue  # the zero-width shared expert written for MoE models without one
            dim = 1 if proj == "down_proj" else 0
            if value.shape[dim] != width * config.n_shared_experts:
                raise CheckpointError(
                    f"{where}: tensor {key}: shape {tuple(value.shape)} does not match "
                    f"shared_expert_intermediate_size {width * config.n_shared_experts}"
                )
            for i, part in enumerate(value.split(width, dim=dim)):
                out[f"{prefix}.shared_experts.{i}.{proj}.weight"] = (part * 0.5 if dim == 1 else part).contiguous()
            continue
        out[key] = value
    return out


def check_config_fits_weights(config: MiniMindConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """The counts and widths that the weights fix, compared before the model is built.

    A config asking for a million layers (or experts) must fail here, naming the field, and not after
    building a million modules; the key-by-key comparison (check_state_dict) then runs on a bounded model.
    """

    def refuse_unless(same: bool, field: str, configured: Any, needed: int, evidence: str) -> None:
        if not same:
            raise CheckpointError(
                f"{where}: weights do not match the config: {field} is {configured} but the weights need {needed} "
                f"({evidence}); correct the config"
            )

    embed = state.get("model.embed_tokens.weight")
    if embed is not None and embed.dim() == 2:
        rows, width = embed.shape
        evidence = f"model.embed_tokens.weight has shape {tuple(embed.shape)}"
        refuse_unless(config.hidden_size == width, "hidden_size", config.hidden_size, width, evidence)
        refuse_unless(config.vocab_size == rows, "vocab_size", config.vocab_size, rows, evidence)
    layers = _count(state, r"model\.layers\.(\d+)\.")
    evidence = (
        f"{'missing' if config.num_hidden_layers > layers else 'unexpected'} tensors: "
        f"model.layers.{min(layers, config.num_hidden_layers)}.*"
    )
    refuse_unless(config.num_hidden_layers == layers, "num_hidden_layers", config.num_hidden_layers, layers, evidence)
    for proj, field in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads")):
        weight = state.get(f"model.layers.0.self_attn.{proj}.weight")
        if weight is not None and weight.dim() == 2:
            heads, rows = getattr(config, field), weight.shape[0]
            refuse_unless(
                heads * config.head_dim == rows,
                f"{field} x head_dim",
                f"{heads} x {config.head_dim} = {heads * config.head_dim}",
                rows,
                f"model.layers.0.self_attn.{proj}.weight has shape {tuple(weight.shape)}",
            )
    if config.use_moe:
        for field, name in (("n_routed_experts", "experts"), ("n_shared_experts", "shared_experts")):
            count = _count(state, rf"model\.layers\.0\.mlp\.{name}\.(\d+)\.")
            configured = getattr(config, field)
            refuse_unless(configured == count, field, configured, count, f"model.layers.0.mlp.{name} holds {count}")


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many distinct numbers the keys have at the pattern's group (layers, experts)."""
    compiled = re.compile(pattern)
    return len({found.group(1) for key in state if (found := compiled.match(key))})


def check_state_dict(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], config: MiniMindConfig, where: str
) -> dict[str, torch.Tensor]:
    """Compare a state_dict with the model's: unknown keys, missing keys and shape mismatches are one clear error.

    `expected` is the model's own state_dict (meta tensors are fine). A missing lm_head with tied embeddings
    is fine; an lm_head that differs from the embedding while the config says tied is a config mismatch.
    """
    state = dict(state)
    if config.tie_word_embeddings and "lm_head.weight" in state and "model.embed_tokens.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise CheckpointError(
                f"{where}: config says tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings to false"
            )
        del state["lm_head.weight"]
    wanted = {k for k in expected if not (config.tie_word_embeddings and k == "lm_head.weight")}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(wanted - set(state))
    problems = []
    if unknown:
        problems.append(f"unexpected tensors (unknown key layout or config mismatch): {_few(unknown)}")
    if missing:
        problems.append(f"missing tensors: {_few(missing)}")
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"tensor {key} has shape {tuple(state[key].shape)}, the config needs {tuple(expected[key].shape)}"
            )
            if len(problems) > 6:
                break
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(problems))
    return state


def _few(keys: list[str], limit: int = 5) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
