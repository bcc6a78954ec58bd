"""Writing a model as a GGUF file that llama.cpp (and Ollama, LM Studio) runs: weights in llama.cpp's
tensor names and layout, the BPE tokenizer, the chat template, and rope/norm metadata, with the `gguf` package.

The architecture is the llama.cpp one that computes the model exactly, and the tensors are laid out for it, by
models/gguf_layout.py: llama, qwen3 or qwen2 for dense models; qwen3moe, llama (Mixtral), ernie4_5-moe or
deepseek for MoE ones.

Quantisation: f32, f16, q8_0 and q4_0 through `gguf.quants`, as llama.cpp's own converter writes them (1-D tensors
and MoE routers stay f32; a matrix whose rows are not a multiple of the 32-value block falls back to f16); q4_k_m as
llama-quantize makes it from an f16 file, with the K-quant blocks computed by models/gguf_kquants.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import MiniMindConfig
from models.errors import CheckpointError
from models.gguf_kquants import q4_k_m_type, quantize_q4_k, quantize_q6_k
from models.gguf_layout import add_layer_metadata, gguf_arch, gguf_tensors

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def write_gguf(
    out: str | Path,
    config: MiniMindConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    *,
    quant: str = "f16",
    force: bool = False,
) -> tuple[Path, str]:
    """Write OUT (a .gguf file) atomically; returns (OUT, architecture)."""
    import gguf

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another output file or pass --force to replace it")
    if quant not in QUANTS:
        raise CheckpointError(
            f"--quant {quant}: not one of {', '.join(QUANTS)} (for other llama.cpp types, write f16 and run "
            "llama.cpp's llama-quantize)"
        )
    if tokenizer is None:
        raise CheckpointError("GGUF export needs the tokenizer; pass --tokenizer DIR")
    arch = gguf_arch(config)
    tensors = gguf_tensors(config, state, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch)
        _add_model_metadata(writer, config, arch, quant)
        _add_tokenizer(writer, tokenizer, config)
        for name, tensor in tensors.items():
            array, qtype = _encode(name, tensor.numpy(), quant, config)
            quantised = qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            writer.add_tensor(name, array, raw_dtype=qtype if quantised else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out, arch


def _encode(name: str, array: np.ndarray, quant: str, config: MiniMindConfig) -> tuple[np.ndarray, Any]:
    """The array in the file's type. 1-D tensors and MoE routers (ffn_gate_inp) stay f32, as llama.cpp's own
    converter writes them; for q8_0/q4_0 a matrix whose rows do not fit the 32-value block falls back to f16;
    q4_k_m gives each matrix the type llama-quantize would (models/gguf_kquants.py)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or quant == "f32" or name.endswith("ffn_gate_inp.weight"):
        return array.astype(np.float32), types.F32
    if quant == "q4_k_m":
        kind = q4_k_m_type(name, array.shape[-1], config.num_hidden_layers, config.tie_word_embeddings)
        if kind == "Q4_K":
            return quantize_q4_k(array), types.Q4_K
        if kind == "Q6_K":
            return quantize_q6_k(array), types.Q6_K
        if kind == "F16":
            return array.astype(np.float16), types.F16
        qtype = types[kind]
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    qtype = {"f16": types.F16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[quant]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == types.F16 or array.shape[-1] % block:
        return array.astype(np.float16), types.F16
    return gguf.quants.quantize(array, qtype), qtype


def _add_model_metadata(writer: Any, config: MiniMindConfig, arch: str, quant: str) -> None:
    import gguf

    writer.add_name("minimind")
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        }[quant]
    )
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    add_layer_metadata(writer, config, arch)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters or {}
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") not in (None, "default"):
        raise CheckpointError(f"rope type {rope.get('rope_type')!r} has no GGUF equivalent here")


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer regex (tokenizer.ggml.pre): GPT-2's or Qwen2's."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        for part in pre.get("pretokenizers", []):
            if part.get("type") == "Split" and "\\p{N}" in json.dumps(part.get("pattern", {})):
                return "qwen2"
    return "default"


def _add_tokenizer(writer: Any, tokenizer: Any, config: MiniMindConfig) -> None:
    """A byte-level BPE tokenizer (tokenizer.ggml.model gpt2): tokens by id, types, merges, special ids,
    chat template. Ids the model has beyond the tokenizer are padding tokens, as llama.cpp's converter writes."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"GGUF export handles byte-level BPE tokenizers; this one is {model.get('type')!r}")
    by_id = {index: token for token, index in model["vocab"].items()}
    kinds = {index: gguf.TokenType.NORMAL for index in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(by_id) + 1
    if size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {size} tokens but the model only {config.vocab_size} embeddings")
    tokens, types = [], []
    for index in range(config.vocab_size):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        types.append(kinds.get(index, gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if bos is not None:
        writer.add_bos_token_id(int(bos))
    if eos is not None:
        writer.add_eos_token_id(int(eos))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    if pad is not None:
        writer.add_pad_token_id(int(pad))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
