"""SIGKILL mid-DPO, mid-distillation and mid-vlm-sft, then resume: the same losses and weights as a run never
stopped (the reference and the teacher are rebuilt from the start weights and the teacher file, not from the
checkpoint; a VLM's fresh encoder and projector come back from the checkpoint)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_training_align import PAIRS
from tests.test_training_resume import ENV, assert_same_model, train_args
from tests.test_training_support import ROOT, conversation, metrics, sentences, train, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    data = write_jsonl(tmp / "p.jsonl", [{"text": t} for t in sentences(20)])
    return train(tmp, data_path=str(data), max_steps=10, lr=1e-2) / "final"


def run_killed_and_resumed(tmp: Path, stage: str, data: Path, **flags) -> None:
    killed, cache = tmp / "killed", tmp / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same CPU kernels, the same sums
    try:
        whole = train(tmp, stage, data_path=str(data), cache_dir=str(cache), output_dir=str(tmp / "whole"), **flags)
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "-m", "minimind", "train", stage, *train_args(data, killed, cache, **flags)]
    process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000005").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed_from = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    total = flags["max_steps"]
    assert resumed_from < total
    done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    reference, after = metrics(whole), metrics(killed)
    for step in range(resumed_from + 1, total + 1):
        for key, value in reference[step].items():
            if key not in ("tokens_per_s", "rollout_tokens_per_s", "step", "lr"):  # clocks differ
                assert abs(after[step][key] - value) <= 1e-6, (step, key)
    assert_same_model(whole, killed, atol=1e-6)


def test_sigkill_mid_dpo_then_resume_equals_an_uninterrupted_run(tmp_path, base):
    data = write_jsonl(tmp_path / "dpo.jsonl", PAIRS)
    flags = dict(max_steps=30, save_every=5, keep_last=2, dropout=0.1, max_seq_len=64, lr=3e-3, grad_accum=2)
    run_killed_and_resumed(tmp_path, "dpo", data, init_from=str(base), **flags)


def test_sigkill_mid_distillation_then_resume_equals_an_uninterrupted_run(tmp_path, base):
    data = write_jsonl(tmp_path / "s.jsonl", [conversation(n) for n in range(8)])
    flags = dict(max_steps=30, save_every=5, keep_last=2, dropout=0.1, max_seq_len=64, lr=3e-3)
    run_killed_and_resumed(tmp_path, "distill", data, teacher=str(base), **flags)


@pytest.mark.slow  # two runs and a killed one: ~50 s on two busy cores
def test_sigkill_mid_vlm_sft_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A fresh LLM, a fresh trained encoder (vision_config) and the projector, on conversations about pictures."""
    import json

    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (40, 70, 220), "green": (30, 170, 60)}
    rows = []
    for n, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (16, 16), rgb).save(tmp_path / f"{name}.png")
        for k in range(3):
            answer = name if k % 2 == 0 else conversation(n + k)["conversations"][1]["content"]
            turns = [{"role": "user", "content": f"<image>\nquestion {k}"}, {"role": "assistant", "content": answer}]
            rows.append({"image": f"{name}.png", "conversations": turns})
    data = write_jsonl(tmp_path / "vlm.jsonl", rows)
    vision = dict(
        model_type="siglip_vision_model",
        image_size=16,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vision_use_head=False,
    )
    flags = dict(max_steps=20, save_every=5, keep_last=2, dropout=0.1, max_seq_len=64, lr=3e-3)
    run_killed_and_resumed(
        tmp_path, "vlm-sft", data, vision_config=vision, train_vision_encoder=True, batch_size=2, **flags
    )
    assert json.loads((tmp_path / "killed" / "final" / "config.json").read_text())["model_type"] == "minimind_vlm"
