"""Checkpoints: resumable trainer state (atomic, last K kept) and final weights the engine loads directly.

A step checkpoint is a directory `checkpoints/step-00001000/` holding `trainer_state.pt` (full model and
optimizer state, step, per-rank RNG states, data position, world size) and `config.yaml`. It is written under a
temporary name and renamed, so a crash (even SIGKILL) mid-save never leaves a checkpoint that looks complete.
The data position is the step itself: the sample order is a pure function of (seed, step), see trainer.py.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.errors import TrainingError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer_state.pt").is_file())


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], config_yaml: str, keep_last: int) -> Path:
    """Write state atomically as checkpoints/step-NNNNNNNN and delete all but the newest `keep_last`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-save; only the main process saves
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest in run_dir for 'auto', none for 'never', else the given path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir() and (path / "trainer_state.pt").is_file():
        return path
    raise TrainingError(
        f"resume={resume}: not a checkpoint directory (expected {path}/trainer_state.pt); use auto or never"
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise TrainingError(
            f"{path / 'trainer_state.pt'}: cannot be read ({err}); delete it or pass --resume never"
        ) from None


def check_world(saved: dict[str, Any], world_size: int, global_batch: int) -> bool:
    """True when per-rank RNG states can be restored as saved; refuse when the data order would change."""
    if saved["world_size"] == world_size:
        return True
    if saved["global_batch"] != global_batch:
        raise TrainingError(
            f"the checkpoint was written by {saved['world_size']} process(es) with a global batch of "
            f"{saved['global_batch']} sequences; now {world_size} process(es) give {global_batch}. Set batch_size/"
            f"grad_accum so that batch_size x grad_accum x processes = {saved['global_batch']}, or start a new run"
        )
    return False


def save_hf_model(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """config.json + model.safetensors + tokenizer files + generation_config.json (with eos), written atomically."""
    from transformers import GenerationConfig

    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=True
    ).save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def save_pth(model: nn.Module, path: Path) -> None:
    """Upstream MiniMind's layout: a flat fp16 state dict with lm_head.weight present even when tied."""
    state = {key: value.detach().half().cpu() for key, value in model.state_dict().items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
