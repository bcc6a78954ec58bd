"""MiniMindForCausalLM: the one model definition of the project (dense and MoE, MiniMind2 and minimind-3).

Two callers drive the forward pass:
- transformers (`generate()`, training, PEFT): `past_key_values` is a transformers `Cache`, masks are built here;
- the engine's hot path: `kv_cache` is an object owned by the engine with one method,
  `attend(layer_idx, q, k, v) -> out`, that stores the new keys/values in its own layout and runs attention
  (static slots for CUDA graphs, or paged blocks); `position_ids` are explicit. The model then never decides
  cache layout or attention kernel, which is what lets the engine capture decode steps as CUDA graphs.

Key names follow upstream MiniMind's checkpoints (`model.layers.N.self_attn.q_proj.weight`, ...), which are also
Llama/Qwen3 names, so conversion is key renaming only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.config import MiniMindConfig
from models.fusion import FusableProjections, fuse, unfuse

# transformers renamed the cache argument and output field from `past_key_values` to `cache` (5.2x); generate()
# passes whichever its version uses, so the forward passes accept both and outputs use the installed name.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# SDPA's backends without cuDNN's, which builds an execution plan for each new shape (tens of ms on an H200): for
# passes whose shapes keep changing (incremental decoding below; the engine's prefills, engine/model_runner.py).
PLANLESS_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class EngineKVCache(Protocol):
    """What the engine passes as `kv_cache`: it stores k/v for `layer_idx` and returns attention output."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class MiniMindModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus the summed MoE load-balancing loss (zero for dense models)."""

    aux_loss: torch.Tensor | None = None


class MiniMindRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 as upstream does; F.rms_norm is one fused kernel on GPU instead of five.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.type_as(x)


class RotaryEmbedding(nn.Module):
    """cos/sin for explicit positions. inv_freq comes from transformers' RoPE functions (default, YaRN, ...).

    It is kept as a plain attribute, not a buffer, so that checkpoints never carry it and meta-device
    loading cannot leave it uninitialised; it is moved to the positions' device on first use.
    """

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        rope = config.rope_parameters
        if rope["rope_type"] == "default":
            dim = config.head_dim
            inv_freq = 1.0 / (
                rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
            )
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, torch.device("cpu"))
        self._inv_freq = {torch.device("cpu"): inv_freq.float()}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and "signed" sin, both [B, 1, T, D], computed once per forward and shared by every layer.

        The signed sin is (-sin, sin) over the two halves, so that rotate_half(x) * sin == x.roll(D/2) * signed_sin:
        one roll instead of two slices, a negation and a concatenation in each layer (small models are bound by
        the number of kernels, not by arithmetic).
        """
        freqs = position_ids.float()[..., None] * self.inv_freq(position_ids.device)
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(dtype)
        signed_sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1).to(dtype)
        return cos, signed_sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/signed_sin: [B, 1, T, D] from RotaryEmbedding (the usual x*cos + rotate_half(x)*sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(FusableProjections):
    fused_name, part_names = "qkv_proj", ("q_proj", "k_proj", "v_proj")

    def __init__(self, config: MiniMindConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = MiniMindRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = MiniMindRMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        kv_cache: EngineKVCache | None,
    ) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(bsz, seq_len, self.num_heads, self.head_dim)
        k = k.view(bsz, seq_len, self.num_kv_heads, self.head_dim)
        v = v.view(bsz, seq_len, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if kv_cache is not None:
            out = kv_cache.attend(self.layer_idx, q, k, v)
        else:
            dropout = self.dropout if self.training else 0.0
            causal = attn_mask is None and seq_len > 1
            if past_key_values is None:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout, enable_gqa=True
                )
            else:
                k, v = past_key_values.update(k, v, self.layer_idx)
                # Incremental decoding (transformers' generate) meets a new key length at every step. On a GPU, the
                # cuDNN attention backend builds an execution plan per new shape: the first generate() over unseen
                # lengths ran at 16 tok/s instead of 185 on an H200 (benchmarks/results/hf-generate-cold-*.json).
                # The flash/efficient kernels need no plan, so this path leaves cuDNN out.
                with sdpa_kernel(PLANLESS_SDPA_BACKENDS):
                    out = F.scaled_dot_product_attention(
                        q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout, enable_gqa=True
                    )
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class FeedForward(FusableProjections):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fused_name, part_names = "gate_up_proj", ("gate_proj", "up_proj")

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """Softmax top-k routing over `n_routed_experts`, plus optional always-on shared experts.

    The auxiliary load-balancing loss is the Switch-Transformer form, alpha * E * sum_i f_i * P_i
    (f_i: fraction of routed slots sent to expert i, P_i: mean router probability), computed only in training.
    """

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.gate = nn.Linear(config.hidden_size, self.n_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.moe_intermediate_size) for _ in range(self.n_experts)
        )
        self.shared_experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_shared_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores = F.softmax(self.gate(flat).float(), dim=-1)
        weights, expert_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(expert_idx == e)
            if token_idx.numel() == 0:
                continue
            expert_out = expert(flat[token_idx]) * weights[token_idx, slot, None].to(flat.dtype)
            out.index_add_(0, token_idx, expert_out)
        for expert in self.shared_experts:
            out = out + expert(flat)
        aux_loss = flat.new_zeros((), dtype=torch.float32)
        if self.training and self.alpha > 0:
            slot_fraction = F.one_hot(expert_idx.reshape(-1), self.n_experts).float().mean(0)
            aux_loss = self.alpha * self.n_experts * (slot_fraction * scores.mean(0)).sum()
        return out.view(shape), aux_loss


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = MiniMindRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiniMindRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            MoEFeedForward(config) if config.use_moe else FeedForward(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x, cos, sin, attn_mask, past_key_values, kv_cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_key_values, kv_cache)
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        if isinstance(mlp_out, tuple):
            return x + mlp_out[0], mlp_out[1]
        return x + mlp_out, None


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniMindRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        kv_cache: EngineKVCache | None = None,
        output_hidden_states: bool = False,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> MiniMindModelOutput:
        if past_key_values is None:
            past_key_values = cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seq_len = x.shape[:2]
        if kv_cache is None and use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=x.device).unsqueeze(0).expand(bsz, -1)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        cos, sin = self.rotary(position_ids, x.dtype)
        attn_mask = None if kv_cache is not None else build_attention_mask(attention_mask, past_len, seq_len, x.device)

        x = self.dropout(x)
        all_hidden = [x] if output_hidden_states else None
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, layer_aux = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, attn_mask, None, None)
            else:
                x, layer_aux = layer(x, cos, sin, attn_mask, past_key_values, kv_cache)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
            if all_hidden is not None:
                all_hidden.append(x)
        x = self.norm(x)
        if all_hidden is not None:
            all_hidden[-1] = x
        return MiniMindModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_loss=aux_loss,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )


def build_attention_mask(
    padding_mask: torch.Tensor | None, past_len: int, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B, 1, T, past+T] mask (True = attend), or None when plain causal attention is exact."""
    if padding_mask is None or bool(padding_mask.all()):
        if past_len == 0 or seq_len == 1:
            return None  # is_causal for prefill; a single new token may see everything
        padding_mask = None
    total = past_len + seq_len
    causal = torch.ones(seq_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len)
    mask = causal[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, -total:].bool()
        # A fully padded query row would give NaN in softmax; let it see itself (its output is ignored).
        diagonal = torch.arange(seq_len, device=device)[:, None] + past_len == torch.arange(total, device=device)
        mask = mask | diagonal[None, None]
    return mask


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def fuse(self) -> MiniMindForCausalLM:
        """q/k/v and gate/up as one GEMM each, in place (inference; see models/fusion.py). state_dict() keeps
        the separate names."""
        return fuse(self)

    def unfuse(self) -> MiniMindForCausalLM:
        """The separate projections again (for training, PEFT), with the same values."""
        return unfuse(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        kv_cache: EngineKVCache | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache if use_cache is not None else (self.config.use_cache and labels is None),
            kv_cache=kv_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels) + out.aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=out.aux_loss,
            logits=logits,
            hidden_states=out.hidden_states,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
        )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
