"""Checkpoints: resumable trainer state (atomic, last K kept) and final weights the engine loads directly.

A step checkpoint is a directory `checkpoints/step-00001000/` holding `trainer_state.pt` (full model and
optimizer state, step, per-rank RNG states, data position, world size) and `config.yaml`. It is written under a
temporary name and renamed, so a crash (even SIGKILL) mid-save never leaves a checkpoint that looks complete.
The data position is the step itself: the sample order is a pure function of (seed, step), see trainer.py.

`trainer_state.pt` holds only tensors, numbers, strings and containers (the RNG states too), and is read with
torch's weights_only loader: a run directory from elsewhere cannot run code through --resume.
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

from training.errors import TrainingError, os_errors

STEP_DIR = re.compile(r"^step-(\d{8})$")


# Checkpoints written before the RNG states were stored as tensors hold numpy's state as an ndarray; these
# numpy globals rebuild exactly that (an array of plain numbers) and nothing else.
# (The rebuild function is taken from numpy itself: numpy 1 and 2 keep it in different modules.)
LEGACY_NUMPY_RNG = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]]
STATE_KEYS = ("model", "optimizer", "scaler", "step", "tokens_seen", "rng", "world_size", "global_batch")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tuples, ints, floats and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        saved = (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["gauss"])
    np.random.set_state(saved)
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
    """Write state atomically as checkpoints/step-NNNNNNNN and delete all but the newest `keep_last`.

    A failed write (full disk, ...) removes its temporary directory, so the space is free again for the next
    run, and stops with one line naming the checkpoint.
    """
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        with os_errors(f"cannot write checkpoint {final}", "--output-dir"):
            root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            with open(tmp / "trainer_state.pt", "wb") as handle:  # a file object: a full disk surfaces as OSError
                torch.save(state, handle)
            (tmp / "config.yaml").write_text(config_yaml)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a run killed mid-save (or stopped by a full disk) left behind: partial step checkpoints and
    final models. Only the main process calls this, before anything of this run is written."""
    found = [
        *(run_dir / "checkpoints").glob(".tmp-step-*"),
        *run_dir.glob("final*.tmp-*"),
        *(run_dir / "final").glob("*.pth.tmp"),
    ]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


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
    """The trainer state of a step checkpoint, read without running code (weights_only): a file holding
    anything but tensors, numbers, strings and containers is refused."""
    from models.checkpoint import load_plain
    from models.errors import CheckpointError

    file = path / "trainer_state.pt"
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_RNG):
            state = load_plain(file)
    except CheckpointError as err:
        raise TrainingError(f"resume: {err}; delete {path} or pass --resume never") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise TrainingError(
            f"resume: {file}: not a trainer state (no {', '.join(missing)}); delete {path} or pass --resume never"
        )
    return state


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
    try:
        with os_errors(f"cannot write the final model {out_dir}", "--output-dir"):
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
            GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                do_sample=True,
            ).save_pretrained(str(tmp))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pth(model: nn.Module, path: Path) -> None:
    """Upstream MiniMind's layout: a flat fp16 state dict with lm_head.weight present even when tied."""
    state = {key: value.detach().half().cpu() for key, value in model.state_dict().items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    tmp = path.with_name(path.name + ".tmp")
    try:
        with os_errors(f"cannot write {path}", "--output-dir"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                torch.save(state, handle)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
