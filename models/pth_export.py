"""Writing a model as upstream MiniMind's checkpoint: a `torch.save`d state_dict in upstream's key layout
(`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight` stored even when tied), half precision by default
as upstream's training scripts save it. Upstream's scripts (eval_llm.py, train_*.py --from_weight) load it with
the matching `--hidden_size`, `--num_hidden_layers` and `--use_moe` flags.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from models.config import MiniMindConfig
from models.errors import CheckpointError


def upstream_problems(config: MiniMindConfig) -> list[str]:
    """What upstream's MiniMindConfig cannot express (empty when the checkpoint runs in upstream's code)."""
    problems = []
    if config.attention_bias:
        problems.append("q/k/v biases (upstream's attention has none)")
    return problems


def write_pth(
    out: str | Path,
    config: MiniMindConfig,
    state: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float16,
    force: bool = False,
) -> Path:
    """Write OUT (a .pth file) atomically: every tensor cast to `dtype`, on the CPU, with its own storage."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another output file or pass --force to replace it")
    problems = upstream_problems(config)
    if problems:
        raise CheckpointError("cannot write an upstream MiniMind .pth: " + "; ".join(problems))
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state.items()}
    if "lm_head.weight" not in tensors:  # upstream's state_dict always carries the (tied) head
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        torch.save(tensors, tmp_name)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out
