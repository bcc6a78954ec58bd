"""Training I/O failures: an unwritable run or cache directory and a full disk stop with one line naming the path
and the fix; a partial checkpoint never outlives the failed save, and stale temporaries are removed at start.

The full-disk cases run twice: with the write made to fail (everywhere) and on a real 600 kB tmpfs in a private
mount namespace (where `unshare -rm` may mount one; skipped elsewhere).
"""

from __future__ import annotations

import errno
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from tests.test_training_resume import ENV, minimind_train, train_args
from tests.test_training_support import ROOT, metrics, sentences, train, write_jsonl
from training.errors import TrainingError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "p.jsonl", [{"text": t} for t in sentences(60)])


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not can_mount_tmpfs(), reason="cannot mount a tmpfs here (unshare -rm)")


def in_namespace(script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace: its tmpfs mounts vanish when it ends."""
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", textwrap.dedent(script)], env=ENV, cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "where, message",
    [
        ("output_dir", "cannot write to the run directory {path}: Not a directory ({parent}); check --output-dir"),
        ("cache_dir", "cannot write the tokenized-data cache {path}/pretrain-p-"),
    ],
)
def test_an_unusable_directory_is_one_line(tmp_path, data, where, message):
    """A directory below a regular file cannot be created (as root too, unlike a chmod)."""
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "below"
    with pytest.raises(TrainingError) as err:
        train(tmp_path, data_path=str(data), **{where: str(path)})
    assert str(err.value).startswith(message.format(path=path, parent=path)), str(err.value)
    assert "--output-dir" in str(err.value) if where == "output_dir" else "--cache-dir" in str(err.value)


@needs_tmpfs
def test_a_read_only_run_directory_fails_before_tokenizing(tmp_path, data):
    run, cache = tmp_path / "ro", tmp_path / "cache"
    run.mkdir()
    args = shlex.join(minimind_train(*train_args(data, run, cache)))
    done = in_namespace(f"mount -t tmpfs -o ro,size=64k tmpfs {run} && exec {args}")
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write to the run directory {run}: Read-only file system"), last
    assert last.endswith("make it writable or set --output-dir to a writable directory"), last
    assert "Traceback" not in done.stderr
    assert not cache.exists()  # stopped before the data was tokenized


def failing_save(written: int):
    """torch.save that writes `written` bytes and then meets a full disk."""

    def save(obj, handle, *args, **kwargs):
        handle.write(b"\0" * written)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(
    tmp_path, data, monkeypatch
):
    run = train(tmp_path, data_path=str(data), max_steps=2, save_every=2)
    monkeypatch.setattr(torch, "save", failing_save(4096))
    with pytest.raises(TrainingError) as err:
        train(tmp_path, data_path=str(data), max_steps=4, save_every=2)
    checkpoint = run / "checkpoints" / "step-00000004"
    assert str(err.value) == (
        f"cannot write checkpoint {checkpoint}: No space left on device; free space on that disk or set "
        "--output-dir to a directory on another disk"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    monkeypatch.undo()
    train(tmp_path, data_path=str(data), max_steps=4, save_every=2)  # resumes from step 2 and finishes
    assert sorted(metrics(run))[-2:] == [3, 4]


def test_a_full_disk_while_saving_the_final_model_is_one_line(tmp_path, data, monkeypatch):
    import safetensors

    from models.model import MiniMindForCausalLM

    def full(self, folder, **kwargs):  # a partial file, then what safetensors raises when the disk is full
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(MiniMindForCausalLM, "save_pretrained", full)
    run = tmp_path / "run-pretrain"
    with pytest.raises(TrainingError) as err:
        train(tmp_path, data_path=str(data), max_steps=1)
    assert str(err.value) == (
        f"cannot write the final model {run / 'final'}: No space left on device; free space on that disk or set "
        "--output-dir to a directory on another disk"
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]


@needs_tmpfs
def test_a_really_full_disk_stops_cleanly_and_the_next_run_resumes(tmp_path, data):
    """On a 600 kB tmpfs the first checkpoint (~390 kB) fits and the second does not; after the failure the
    partial checkpoint is gone, and once there is room the same command resumes from the first one."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    run.mkdir()
    args = shlex.join(minimind_train(*train_args(data, run, cache, max_steps=4, save_every=2, keep_last=1)))
    done = in_namespace(
        f"""
        mount -t tmpfs -o size=600k tmpfs {run} || exit 99
        {args} 2> {tmp_path}/first.err; echo "first=$?"
        ls -A {run}/checkpoints
        mount -o remount,size=8m {run} || exit 99
        {args} 2> {tmp_path}/second.err; echo "second=$?"
        ls -A {run}/final
        """
    )
    lines = done.stdout.split()
    first_err = (tmp_path / "first.err").read_text().strip().splitlines()
    assert "first=1" in lines, first_err[-20:]
    assert first_err[-1] == (
        f"error: cannot write checkpoint {run / 'checkpoints' / 'step-00000004'}: No space left on device; "
        "free space on that disk or set --output-dir to a directory on another disk"
    )
    assert not any(line.startswith("Traceback") for line in first_err)
    assert lines[lines.index("first=1") + 1] == "step-00000002"  # no .tmp-step-* left behind
    second_err = (tmp_path / "second.err").read_text()
    assert "second=0" in lines, second_err[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'}" in second_err
    assert "model.safetensors" in lines


def test_stale_temporaries_are_removed_at_start_and_logged(tmp_path, data, caplog):
    run = train(tmp_path, data_path=str(data), max_steps=2, save_every=1)
    stale = [
        run / "checkpoints" / ".tmp-step-00000003-99999",
        run / "final.tmp-99999",
        run / "final" / "pretrain_32.pth.tmp",
    ]
    for path in stale[:2]:
        path.mkdir()
        (path / "trainer_state.pt").write_bytes(b"partial")
    stale[2].write_bytes(b"partial")
    with caplog.at_level("INFO", logger="minimind.train"):
        train(tmp_path, data_path=str(data), max_steps=2, save_every=1)  # already done: resumes at the end
    for path in stale:
        assert not path.exists()
        assert f"removed {path}, left by an interrupted save" in caplog.text
