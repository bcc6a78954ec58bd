"""Checkpoints and resume: SIGKILL mid-run then resume equals a run never stopped; another process count resumes
exactly (DDP and FSDP under torchrun, gloo on CPU) or is refused clearly; checkpoints are atomic and pruned."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_training_support import ROOT, config_values, metrics, sentences, train, write_jsonl
from training.checkpoint import rng_state, set_rng_state
from training.errors import TrainingError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "p.jsonl", [{"text": t} for t in sentences(60)])


def train_args(data: Path, out: Path, cache: Path, **flags) -> list[str]:
    """Command-line flags for the same tiny run that tests.test_training_support.train() makes in-process."""
    values = config_values(out.parent, data_path=str(data), output_dir=str(out), cache_dir=str(cache), **flags)
    values.pop("stage")
    args = []
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


def minimind_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "minimind", "train", "pretrain", *args]


def assert_same_model(a: Path, b: Path, atol: float) -> None:
    left, right = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(right[key], left[key], atol=atol, rtol=0, msg=key)


def test_sigkill_then_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, data):
    """Dropout on, so the RNG state must be restored too; killed with SIGKILL right after a checkpoint."""
    flags = dict(max_steps=60, save_every=5, keep_last=2, dropout=0.1)
    killed, cache = tmp_path / "killed", tmp_path / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same CPU kernels, the same sums
    try:
        whole = train(tmp_path, data_path=str(data), cache_dir=str(cache), output_dir=str(tmp_path / "whole"), **flags)
    finally:
        torch.set_num_threads(threads)

    process = subprocess.Popen(
        minimind_train(*train_args(data, killed, cache, **flags)),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000005").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "final").exists()
    resumed_from = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    assert resumed_from < 60

    done = subprocess.run(
        minimind_train(*train_args(data, killed, cache, **flags)), env=ENV, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / f'step-{resumed_from:08d}'}" in done.stderr
    reference, after = metrics(whole), metrics(killed)
    for step in range(resumed_from + 1, 61):
        assert abs(after[step]["loss"] - reference[step]["loss"]) <= 1e-6, step
    assert_same_model(whole, killed, atol=1e-6)
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["step-00000055", "step-00000060"]  # keep_last=2, no temporary directory left


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "minimind", "train", "pretrain", *args], env=ENV, cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.slow  # two torchrun processes: ~15 s each on two cores
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_on_two_processes_continues_exactly(tmp_path, data, mode):
    """A one-process checkpoint resumed by two processes (batch halved: same global batch, same data order)
    reaches the same losses and weights as the one-process run."""
    reference = train(
        tmp_path,
        data_path=str(data),
        max_steps=6,
        save_every=3,
        keep_last=5,
        batch_size=4,
        output_dir=str(tmp_path / "one"),
    )
    two = tmp_path / "two"
    shutil.copytree(reference / "checkpoints" / "step-00000003", two / "checkpoints" / "step-00000003")
    done = torchrun(
        *train_args(data, two, tmp_path / "cache", max_steps=6, save_every=3, batch_size=2, distributed=mode)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    ref, got = metrics(reference), metrics(two)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-5)
    assert_same_model(reference, two, atol=1e-5)


def test_resume_with_another_global_batch_is_refused(tmp_path, data):
    run = train(tmp_path, data_path=str(data), max_steps=2, save_every=1)
    state_path = run / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=False)
    state.update(world_size=2, global_batch=8)  # as if written by two processes of batch 4
    torch.save(state, state_path)
    with pytest.raises(TrainingError) as err:
        train(tmp_path, data_path=str(data), max_steps=4, save_every=1)
    assert "written by 2 process(es) with a global batch of 8 sequences; now 1 process(es) give 4" in str(err.value)
    assert "batch_size x grad_accum x processes = 8" in str(err.value)
    # the fix it names works: batch 8 on one process resumes
    train(tmp_path, data_path=str(data), max_steps=4, save_every=1, batch_size=8)
    assert sorted(metrics(run))[-2:] == [3, 4]


def test_explicit_resume_paths_and_unreadable_checkpoints(tmp_path, data):
    run = train(tmp_path, data_path=str(data), max_steps=2, save_every=1, keep_last=1)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    with pytest.raises(TrainingError, match="not a checkpoint directory"):
        train(tmp_path, data_path=str(data), resume=str(tmp_path / "nowhere"))
    (run / "checkpoints" / "step-00000002" / "trainer_state.pt").write_bytes(b"truncated")
    with pytest.raises(TrainingError, match="not a readable PyTorch checkpoint .*; delete .* or pass --resume never"):
        train(tmp_path, data_path=str(data), max_steps=3)
    train(tmp_path, data_path=str(data), max_steps=3, resume="never")
    assert sorted(metrics(run)) == [1, 2, 3]


# ---- a resume file is data, never code ----


class WritesMarker:
    """Pickles as a call of open(path, "w"): loading it with plain pickle creates the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("how", ["explicit", "auto"])
def test_a_trainer_state_that_would_run_code_is_refused(tmp_path, data, how):
    """A run directory from elsewhere: its trainer_state.pt is a real one plus a __reduce__ payload."""
    flags = dict(max_steps=2, save_every=1, keep_last=1)
    run = train(tmp_path, data_path=str(data), **flags)
    checkpoint = run / "checkpoints" / "step-00000002"
    marker = tmp_path / "payload-ran"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    state["scaler"] = {"scale": WritesMarker(marker)}
    torch.save(state, checkpoint / "trainer_state.pt")
    resume = ["--resume", str(checkpoint)] if how == "explicit" else []  # auto: the newest checkpoint in run
    done = subprocess.run(
        minimind_train(*train_args(data, run, tmp_path / "cache", **{**flags, "max_steps": 3}), *resume),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert not marker.exists(), "the payload ran"
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: resume: {checkpoint / 'trainer_state.pt'}: not a plain state dict"), error
    assert "refused for safety" in error and "pass --resume never" in error
    assert "Traceback" not in done.stderr and "weights_only" not in done.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # nothing trained or saved


def test_rng_states_load_without_code_and_restore_the_streams():
    saved = rng_state()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_checkpoint_with_the_older_numpy_rng_layout_still_resumes(tmp_path, data):
    """Checkpoints written before the RNG states were tensors hold numpy's state as an ndarray."""
    run = train(tmp_path, data_path=str(data), max_steps=2, save_every=1)
    path = run / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    np.random.seed(7)
    state["rng"][0]["numpy"] = np.random.get_state()
    torch.save(state, path)
    train(tmp_path, data_path=str(data), max_steps=3, save_every=1)
    assert sorted(metrics(run))[-1] == 3
