"""Which llama.cpp architecture represents a model exactly, and our weights under that architecture's tensor
names and metadata keys. models/gguf_export.py writes the file.

Dense models map to `llama`, `qwen3` or `qwen2` by the rules of models/export.py. For MoE, llama.cpp has no
architecture of its own for MiniMind; four of its architectures compute our MoE layer exactly in some cases. What
decides is the routing (ours: softmax over the experts, top k, the k weights renormalised to sum 1 only when
`norm_topk_prob` and k > 1, as upstream does), shared experts (ours: always on, ungated) and per-head q/k norm.
What llama.cpp does, read from its model graphs (src/models/*.cpp):

| architecture | routed weights renormalised | shared experts | q/k norm | rope pairs |
| --- | --- | --- | --- | --- |
| `qwen3moe` | always | none | yes | halves |
| `llama` (Mixtral layout) | always | none | no | interleaved |
| `ernie4_5-moe` | always | optional, ungated | no | interleaved |
| `deepseek` (V1) | never | at least one, ungated | no | interleaved |

A model without shared experts gets, for deepseek, one of all zeros (its output is exactly 0). qwen2moe is not
used: it gates its shared expert by sigmoid computed as silu(z) / z, so the zero gate that makes Hugging Face's
qwen2_moe exact (models/export.py) gives 0 / 0 there. Architectures with interleaved rope pairs get q/k rows
permuted as llama.cpp's own convert_hf_to_gguf.py does. Anything else (top-1 routing with q/k norm, for one: minimind-3-MoE's shape) is
refused with the reason, since llama.cpp would compute a different function.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from models.config import MiniMindConfig
from models.errors import CheckpointError
from models.export import target_problems

DENSE_ARCHS = ("llama", "qwen3", "qwen2")
MOE_ARCHS = ("qwen3moe", "llama", "ernie4_5-moe", "deepseek")
INTERLEAVED_ROPE = ("llama", "ernie4_5-moe", "deepseek")  # llama.cpp's LLAMA_ROPE_TYPE_NORM: q/k rows are permuted

# our key (inside model.layers.N.) -> llama.cpp's (inside blk.N.)
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}
_EXPERT = re.compile(r"mlp\.(experts|shared_experts)\.(\d+)\.(gate_proj|up_proj|down_proj)")
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def moe_problems(config: MiniMindConfig, arch: str) -> list[str]:
    """Why llama.cpp's `arch` would compute a different MoE layer than ours (empty when it computes the same)."""
    renormalised = config.norm_topk_prob and config.num_experts_per_tok > 1
    problems = []
    if arch == "qwen3moe" and not config.qk_norm:
        problems.append("it always applies q/k norm and the model has none")
    if arch != "qwen3moe" and config.qk_norm:
        problems.append("it has no per-head q/k norm")
    if arch != "deepseek" and not renormalised:
        problems.append(
            "it renormalises the top-k routing weights to sum 1, and this model does not "
            f"(num_experts_per_tok {config.num_experts_per_tok}, norm_topk_prob {config.norm_topk_prob})"
        )
    if arch == "deepseek" and renormalised:
        problems.append("it never renormalises the top-k routing weights, and this model does")
    if arch in ("qwen3moe", "llama") and config.n_shared_experts:
        problems.append("it has no shared experts")
    if config.attention_bias:
        problems.append("MoE models with q/k/v biases are not exported to GGUF here")
    if arch == "deepseek" and config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} x heads must equal hidden_size {config.hidden_size}")
    return problems


def gguf_arch(config: MiniMindConfig) -> str:
    """The first llama.cpp architecture that computes the model exactly; refused, with each one's reason, if none."""
    if config.use_moe:
        problems = {arch: moe_problems(config, arch) for arch in MOE_ARCHS}
        kind = "MoE layer"
    else:
        problems = {arch: target_problems(config, arch) for arch in DENSE_ARCHS}
        kind = "dense Llama/Qwen2/Qwen3 layout"
    for arch, found in problems.items():
        if not found:
            return arch
    reasons = "; ".join(f"{arch}: {', '.join(p)}" for arch, p in problems.items())
    raise CheckpointError(
        f"no llama.cpp architecture computes this {kind} exactly ({reasons}). Convert to a Hugging Face "
        "directory instead (minimind convert SRC OUT), which transformers and vLLM run"
    )


def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for interleaved rope pairs (convert_hf_to_gguf.py's `permute`)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(config: MiniMindConfig, state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Our state_dict under llama.cpp's names, float32; q/k permuted for interleaved rope; experts stacked into
    one (experts, out, in) tensor per projection; shared experts concatenated into one wide FFN."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        tensor = tensor.detach().float().cpu()
        if key == "model.embed_tokens.weight":
            out["token_embd.weight"] = tensor
        elif key == "model.norm.weight":
            out["output_norm.weight"] = tensor
        elif key == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["output.weight"] = tensor
        elif key.startswith("model.layers."):
            layer, rest = key.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            match = _EXPERT.fullmatch(module)
            if match:
                group, index, proj = match.groups()
                experts.setdefault((layer, group, proj), {})[int(index)] = tensor
                continue
            if module not in _LAYER_NAMES:
                raise CheckpointError(f"{key}: no GGUF tensor for this weight")
            if arch in INTERLEAVED_ROPE and module == "self_attn.q_proj":
                tensor = llama_cpp_permute(tensor, config.num_attention_heads)
            if arch in INTERLEAVED_ROPE and module == "self_attn.k_proj":
                tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
            out[f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"] = tensor
        else:
            raise CheckpointError(f"{key}: no GGUF tensor for this weight")
    for (layer, group, proj), by_index in experts.items():
        parts = [by_index[i] for i in sorted(by_index)]
        if group == "experts":
            out[f"blk.{layer}.ffn_{_PROJ[proj]}_exps.weight"] = torch.stack(parts)
        else:
            out[f"blk.{layer}.ffn_{_PROJ[proj]}_shexp.weight"] = torch.cat(parts, dim=1 if proj == "down_proj" else 0)
    if arch == "deepseek" and not config.n_shared_experts:  # it needs one: all zeros adds exactly 0
        width, hidden = config.moe_intermediate_size, config.hidden_size
        for layer in range(config.num_hidden_layers):
            out[f"blk.{layer}.ffn_gate_shexp.weight"] = torch.zeros(width, hidden)
            out[f"blk.{layer}.ffn_up_shexp.weight"] = torch.zeros(width, hidden)
            out[f"blk.{layer}.ffn_down_shexp.weight"] = torch.zeros(hidden, width)
    return out


def add_layer_metadata(writer: Any, config: MiniMindConfig, arch: str) -> None:
    """Feed-forward widths and, for MoE, the expert counts each architecture's loader reads."""
    if not config.use_moe:
        writer.add_feed_forward_length(config.intermediate_size)
        return
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch == "llama":  # the Mixtral layout sizes its experts by feed_forward_length
        writer.add_feed_forward_length(config.moe_intermediate_size)
        return
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "deepseek":
        writer.add_expert_shared_count(max(config.n_shared_experts, 1))
        writer.add_expert_weights_scale(1.0)
        writer.add_leading_dense_block_count(0)
    if arch == "ernie4_5-moe":
        writer.add_expert_shared_feed_forward_length(config.n_shared_experts * config.moe_intermediate_size)
        writer.add_interleave_moe_layer_step(1)
        writer.add_leading_dense_block_count(0)
