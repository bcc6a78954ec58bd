"""Writing our model as a Hugging Face directory that plain transformers loads (llama, qwen2, qwen3, qwen2_moe,
qwen3_moe) or as our own `minimind` type, with tokenizer files and a generation_config that stops at the chat's
end token. The directory is written into a temporary sibling and renamed into place, so a failure never leaves
a half-written OUT.

Experts are written one tensor per expert (`mlp.experts.E.gate_proj.weight`): that is what transformers 5's
`save_pretrained` writes for Qwen2-MoE/Qwen3-MoE (it fuses them on load) and what vLLM and llama.cpp read.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.config import MiniMindConfig
from models.errors import CheckpointError

TARGETS = ("minimind", "llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
# `auto` takes the first target, in this order, that represents the model exactly in plain transformers.
AUTO_ORDER = ("llama", "qwen3", "qwen2", "qwen3_moe", "qwen2_moe")
ARCHITECTURES = {
    "minimind": "MiniMindForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# Chat end tokens that must stop generation in a converted model, whichever the tokenizer knows.
CHAT_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


def target_problems(config: MiniMindConfig, target: str) -> list[str]:
    """Why `target` cannot represent this model exactly (empty when it can)."""
    if target == "minimind":
        return []
    if target not in TARGETS:
        return [f"unknown target {target!r}; choose one of {', '.join(TARGETS)} or auto"]
    moe_target = target.endswith("_moe")
    problems = []
    if config.use_moe and not moe_target:
        problems.append("the model is MoE and this target is dense (use qwen3_moe, qwen2_moe or minimind)")
    if moe_target and not config.use_moe:
        problems.append("the model is dense and this target is MoE (use llama, qwen3 or qwen2)")
    if config.qk_norm and target in ("llama", "qwen2", "qwen2_moe"):
        problems.append("the model has per-head q/k RMSNorm, which this target lacks (use qwen3 or qwen3_moe)")
    if not config.qk_norm and target in ("qwen3", "qwen3_moe"):
        problems.append("the model has no q/k norm, which this target always applies (use llama or qwen2_moe)")
    if config.attention_bias and target in ("llama", "qwen3", "qwen3_moe"):
        problems.append("the model has q/k/v biases only; this target biases o_proj too (use qwen2 or qwen2_moe)")
    if not config.attention_bias and target == "qwen2":
        problems.append("qwen2 always has q/k/v biases; the model has none (use llama)")
    if target in ("qwen2", "qwen2_moe") and config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} x heads must equal hidden_size {config.hidden_size} for {target}")
    if config.use_moe and config.n_shared_experts and target == "qwen3_moe":
        problems.append("the model has shared experts, which qwen3_moe lacks (use qwen2_moe or minimind)")
    return problems


def choose_target(config: MiniMindConfig, target: str) -> str:
    """Resolve `auto`, or refuse a target that cannot represent the model, saying why and what to use."""
    if target == "auto":
        return next((t for t in AUTO_ORDER if not target_problems(config, t)), "minimind")
    problems = target_problems(config, target)
    if problems:
        raise CheckpointError(f"cannot convert to {target}: " + "; ".join(problems))
    return target


def hf_config(config: MiniMindConfig, target: str, dtype: torch.dtype) -> Any:
    """The transformers config object for `target` that computes the same function as `config`."""
    from transformers import AutoConfig

    if target == "minimind":
        out = MiniMindConfig.from_dict(config.to_dict())
        out.architectures = [ARCHITECTURES[target]]
        out.dtype = dtype
        return out
    fields: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        architectures=[ARCHITECTURES[target]],
        dtype=dtype,
    )
    if target == "llama":
        fields.update(attention_bias=False, mlp_bias=False)
    if target in ("qwen2", "qwen2_moe"):
        fields.pop("head_dim")
        fields["use_sliding_window"] = False
    if target.endswith("_moe"):
        fields.update(
            num_experts=config.n_routed_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            # Our router renormalises only when top_k > 1 (upstream's rule); say exactly that.
            norm_topk_prob=bool(config.norm_topk_prob and config.num_experts_per_tok > 1),
            router_aux_loss_coef=config.aux_loss_alpha,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if target == "qwen2_moe":
        fields.update(
            qkv_bias=config.attention_bias,
            shared_expert_intermediate_size=config.n_shared_experts * config.moe_intermediate_size,
        )
    return AutoConfig.for_model(target, **fields)


def export_state_dict(
    state: dict[str, torch.Tensor], config: MiniMindConfig, target: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Our state_dict renamed for `target`, cast to `dtype`, each tensor its own contiguous storage.

    For qwen2_moe the shared experts are concatenated along the intermediate dimension into one
    `shared_expert`, its down_proj doubled and `shared_expert_gate` set to zero: sigmoid(0) * 2 = 1 exactly,
    so the gated shared expert equals our ungated one bit for bit (doubling is exact in floating point).
    """
    out: dict[str, torch.Tensor] = {}
    shared: dict[str, dict[str, list[torch.Tensor]]] = {}
    for key, value in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        match = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.shared_experts\.(\d+)\.(\w+)\.weight", key)
        if target == "qwen2_moe" and match:
            prefix, index, proj = match.groups()
            shared.setdefault(prefix, {}).setdefault(proj, []).append((int(index), value))
            continue
        out[key] = value
    for prefix, projections in shared.items():
        for proj, parts in projections.items():
            tensors = [t for _, t in sorted(parts, key=lambda p: p[0])]
            merged = torch.cat(tensors, dim=1 if proj == "down_proj" else 0)
            out[f"{prefix}.shared_expert.{proj}.weight"] = merged * 2 if proj == "down_proj" else merged
    if target == "qwen2_moe":
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp"
            out[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size)
            if not config.n_shared_experts:  # qwen2_moe always has a shared expert: give it zero width
                for proj, shape in (("gate_proj", (0, config.hidden_size)), ("up_proj", (0, config.hidden_size))):
                    out[f"{prefix}.shared_expert.{proj}.weight"] = torch.zeros(shape)
                out[f"{prefix}.shared_expert.down_proj.weight"] = torch.zeros(config.hidden_size, 0)
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def generation_config(config: MiniMindConfig, tokenizer: Any) -> Any:
    """bos/eos/pad for generate(): eos lists the model's eos plus every chat end token the tokenizer knows."""
    from transformers import GenerationConfig

    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = [e for e in eos if e is not None]
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        candidates = [tokenizer.eos_token, *CHAT_END_TOKENS]
        eos += [vocab[t] for t in candidates if t is not None and t in vocab]
    eos = list(dict.fromkeys(eos))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos if len(eos) != 1 else eos[0], pad_token_id=pad
    )


def write_hf_dir(
    out: str | Path,
    config: MiniMindConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    *,
    target: str = "minimind",
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Write OUT = config.json, model.safetensors, tokenizer files, generation_config.json, atomically.

    An existing OUT is an error unless `force`; then it is replaced only after the new one is complete.
    """
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another output directory or pass --force to replace it")
    if target not in TARGETS:
        raise CheckpointError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf_config(config, target, dtype).save_pretrained(tmp)
        tensors = export_state_dict(state, config, target, dtype)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        generation_config(config, tokenizer).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp, save_jinja_files=False)  # template inside tokenizer_config.json
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old `out` is moved aside first and deleted only after the rename succeeded."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
