"""`minimind plot RUN_DIR`: a training run's metrics.jsonl drawn as one PNG (loss, lr, grad norm, tokens/s, and
whatever else the stage logs), for people who look at curves rather than read numbers.

A resumed run appends to the same metrics.jsonl and may log a step again; the row written last is the one kept,
because it belongs to the run that went on from there.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from training.errors import TrainingError

# Logged once per start (how much data the run saw), not curves over steps.
RUN_INFO = {"bad_lines", "samples"}
# Drawn first, in this order, when present; the stage's own metrics follow alphabetically.
PREFERRED = ["loss", "lr", "grad_norm", "tokens_per_s", "mfu"]
LABELS = {"lr": "learning rate", "grad_norm": "gradient norm (before clipping)", "tokens_per_s": "tokens/s"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  minimind plot runs/pretrain                    writes runs/pretrain/metrics.png\n"
        "  minimind plot runs/sft --metrics loss,lr --out sft.png"
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's directory (it holds metrics.jsonl)")
    parser.add_argument("--out", metavar="FILE", help="the PNG to write (default: RUN_DIR/metrics.png)")
    parser.add_argument(
        "--metrics", metavar="A,B", help="only these metrics, comma-separated (default: every logged curve)"
    )


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).expanduser()
    series = read_metrics(run_dir / "metrics.jsonl")
    wanted = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    out = Path(args.out).expanduser() if args.out else run_dir / "metrics.png"
    drawn = plot_metrics(series, out, title=str(run_dir), only=wanted)
    print(f"wrote {out} ({', '.join(drawn)})")
    return 0


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] sorted by step, the last row written winning for a step logged twice."""
    if not path.is_file():
        raise TrainingError(f"{path}: no such file; give the run directory that `minimind train` wrote")
    latest: dict[str, dict[int, float]] = {}
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise TrainingError(
                    f'{path}:{lineno}: not a metrics row ({err}); expected {{"step": N, ...}}'
                ) from None
            for name, value in row.items():
                if name == "step" or name in RUN_INFO or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    latest.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in latest.items()}


def plot_metrics(
    series: dict[str, list[tuple[int, float]]], out: Path, title: str = "", only: list[str] | None = None
) -> list[str]:
    """Draw one panel per metric, sharing the step axis; returns the metric names drawn, in order."""
    names = [n for n in PREFERRED if n in series] + sorted(n for n in series if n not in PREFERRED)
    if only is not None:
        unknown = [n for n in only if n not in series]
        if unknown:
            raise TrainingError(f"--metrics: {', '.join(unknown)} not logged in this run; logged: {', '.join(names)}")
        names = only
    if not names:
        raise TrainingError("the run has logged no metrics yet (its first row comes after --log-every steps)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainingError("plotting needs matplotlib: pip install 'my-minimind[bench]'") from None

    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        ax.plot(steps, values, lw=1.4, marker="." if len(steps) < 30 else None)
        ax.set_ylabel(LABELS.get(name, name))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if name == "loss" and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return names
