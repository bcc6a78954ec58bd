"""End-to-end demo on one GPU: pretrain a preset on the demo corpus for a time budget, SFT it on the demo Q&A set,
chat with the result through `minimind generate`, and save loss curves (PNG), tokens/s (JSON) and the transcript.

Both trainings run the real command (`minimind train --config configs/...` with flags on top); the number of
steps that fits the time budget comes from a short calibration of the same trainer step first.

    minimind data demo data/demo
    minimind tokenizer train --data data/demo/pretrain.jsonl --vocab-size 6400 --out data/demo/tokenizer
    python benchmarks/train_demo.py --data data/demo --out runs/train-demo --pretrain-seconds 120 --sft-seconds 60
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from training.config import TrainConfig, load_config  # noqa: E402
from training.stages import get_stage  # noqa: E402
from training.trainer import Trainer  # noqa: E402

PROMPTS = ["你好，你是谁？", "What is AI?"]


def calibrate(cfg: TrainConfig, seconds: float, scratch: Path) -> tuple[int, float]:
    """(steps that fit in `seconds`, measured seconds per step) from 20 timed steps after 5 warm-up steps.

    Rough for SFT: every new padded width costs extra the first time it is seen (GEMM heuristics, allocator)."""
    probe = dataclasses.replace(cfg, max_steps=10**6, output_dir=str(scratch), report_to="none", resume="never")
    trainer = Trainer(probe, get_stage(probe.stage))
    trainer.setup()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for step in range(5):
        trainer.train_step(step)
    sync()
    start = time.perf_counter()
    for step in range(5, 25):
        trainer.train_step(step)
    sync()
    per_step = (time.perf_counter() - start) / 20
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return max(1, int(seconds / per_step)), per_step


def train(config: str, overrides: dict, seconds: float, scratch: Path, log: Path) -> dict:
    """Calibrate, then run `minimind train --config CONFIG --key value ...`; returns what was run and measured."""
    cfg = load_config(ROOT / config, overrides)
    steps, per_step = calibrate(cfg, seconds, scratch)
    flags = []
    for key, value in {**overrides, "max_steps": steps}.items():
        flags += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    command = [sys.executable, "-m", "minimind", "train", "--config", config, *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10"}
    start = time.perf_counter()
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    run_dir = Path(cfg.output_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    positions = steps * cfg.batch_size * cfg.grad_accum * cfg.max_seq_len
    return {
        "config": config,
        "overrides": overrides,
        "steps": steps,
        "calibrated_step_ms": round(per_step * 1e3, 2),
        "wall_s": round(wall, 1),
        "tokens_per_s_logged": round(sum(r["tokens_per_s"] for r in losses[1:]) / max(1, len(losses) - 1)),
        "sequence_positions": positions if cfg.stage == "pretrain" else None,
        "first_loss": losses[0]["loss"],
        "last_loss": losses[-1]["loss"],
        "curve": [[row["step"], round(row["loss"], 4)] for row in losses],
        "final": str(run_dir / "final"),
    }


def plot(result: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*result["curve"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chat(model: str, prompts: list[str]) -> str:
    lines = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for prompt in prompts:
        command = [sys.executable, "-m", "minimind", "generate", "--model", model, "--chat", "--prompt", prompt]
        command += ["--max-tokens", "96", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1", "-n", "2"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        lines += ["$ minimind " + " ".join(shlex.quote(part) for part in command[3:])]
        lines += [done.stdout.strip() or done.stderr.strip()[-2000:], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with pretrain.jsonl, sft.jsonl and tokenizer/")
    parser.add_argument("--out", required=True, help="folder for runs, cache, PNG/JSON/transcript")
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--pretrain-seconds", type=float, default=120)
    parser.add_argument("--sft-seconds", type=float, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--model-config", default="", help="JSON overrides of the model shape (CPU tests)")
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train-demo.log"
    shape = {"model_config": json.loads(args.model_config)} if args.model_config else {}
    common = {"cache_dir": str(out / "cache"), "report_to": "none", "save_every": 0, "log_every": 10}
    pretrain = train(
        f"configs/pretrain-{args.preset}.yaml",
        {
            **common,
            **shape,
            "tokenizer": str(data / "tokenizer"),
            "data_path": str(data / "pretrain.jsonl"),
            "output_dir": str(out / "pretrain"),
            "max_seq_len": args.seq,
            "batch_size": args.batch,
            "grad_accum": 1,
        },
        args.pretrain_seconds,
        out / "probe-pretrain",
        log,
    )
    sft = train(
        f"configs/sft-{args.preset}.yaml",
        {
            **common,
            "init_from": pretrain["final"],
            "data_path": str(data / "sft.jsonl"),
            "output_dir": str(out / "sft"),
            "max_seq_len": args.seq,
            "batch_size": args.batch,
            "lr": 2e-4,
        },
        args.sft_seconds,
        out / "probe-sft",
        log,
    )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    plot(
        pretrain,
        f"pretrain {args.preset} on the demo corpus, {pretrain['steps']} steps\n{device}, {stamp[:10]}",
        out / "train-demo-pretrain-loss.png",
    )
    plot(
        sft,
        f"SFT {args.preset} on the demo Q&A set, {sft['steps']} steps\n{device}, {stamp[:10]}",
        out / "train-demo-sft-loss.png",
    )
    transcript = chat(sft["final"], PROMPTS)
    (out / "train-demo-chat.txt").write_text(
        f"# {args.preset} after the demo pretrain + SFT ({device}, {stamp})\n\n" + transcript
    )
    summary = {
        **provenance(__file__),
        "device": device,
        "torch": torch.__version__,
        "date": stamp,
        "preset": args.preset,
        "pretrain": pretrain,
        "sft": sft,
    }
    (out / "train-demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in pretrain.items() if k != "curve"}, ensure_ascii=False))
    print(json.dumps({k: v for k, v in sft.items() if k != "curve"}, ensure_ascii=False))
    print(transcript)


if __name__ == "__main__":
    main()
