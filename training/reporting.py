"""What the loop reports and where it goes: a step's stats, their mean over a log window, throughput and MFU;
metrics.jsonl in the run directory (always), plus TensorBoard, wandb or swanlab.

metrics.jsonl is the plain record that tests, plots and resumed runs read; the others are optional viewers,
imported only when asked for so a missing package fails with the install command instead of at import time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.errors import TrainingError, os_errors

# Dense bf16 peak of the GPUs MFU is reported for (FLOP/s); others show no MFU rather than a wrong one.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus the attention scores (PaLM's appendix B estimate)."""
    return 6 * num_params + 12 * num_layers * hidden_size * seq_len


@dataclass
class StepStats:
    """One optimizer step as the loop sees it. loss_sum and metrics are this process's sums (device tensors,
    read only at log time so the step never waits for the GPU); count is the whole step's (all processes)."""

    loss_sum: torch.Tensor
    count: int
    positions: int  # token positions processed by all processes (padding included): throughput
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / max(self.count, 1)  # single process; the window all-reduces


class MetricWindow:
    """Sums steps between two log lines; `flush` gives each value as sum / count over the window (all processes)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.positions, self.start = 0, 0, time.perf_counter()

    def add(self, stats: StepStats) -> None:
        for key, value in {"loss": stats.loss_sum, **stats.metrics}.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.detach().float().clone()
        self.count += stats.count
        self.positions += stats.positions

    def flush(self) -> tuple[dict[str, float], float]:
        """({name: mean over the window}, token positions per second); then starts a new window."""
        names = list(self.sums)
        packed = torch.stack([self.sums[name].reshape(()) for name in names])
        if dist.is_initialized():
            dist.all_reduce(packed)
        values = {name: value / max(self.count, 1) for name, value in zip(names, packed.tolist())}
        speed = self.positions / max(time.perf_counter() - self.start, 1e-9)
        self.reset()
        return values, speed


class Reporter:
    def __init__(self, run_dir: Path, report_to: str, run_name: str, config: dict[str, Any], enabled: bool) -> None:
        self.enabled = enabled
        self.sinks: list[Any] = []
        self.jsonl = None
        if not enabled:
            return
        self.where = run_dir / "metrics.jsonl"
        with os_errors(f"cannot write {self.where}", "--output-dir"):
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = self.where.open("a")
        for name in [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]:
            self.sinks.append(self._open(name, run_dir, run_name or run_dir.name, config))

    @staticmethod
    def _open(name: str, run_dir: Path, run_name: str, config: dict[str, Any]) -> Any:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                return ("tensorboard", SummaryWriter(str(run_dir / "tensorboard")))
            if name == "wandb":
                import wandb

                return ("wandb", wandb.init(project="minimind", name=run_name, config=config, dir=str(run_dir)))
            if name == "swanlab":
                import swanlab

                return ("swanlab", swanlab.init(project="minimind", experiment_name=run_name, config=config))
        except ImportError:
            raise TrainingError(f"--report-to {name} needs the {name} package: pip install {name}") from None
        raise TrainingError(f"--report-to {name}: unknown; choose tensorboard, wandb, swanlab or none")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with os_errors(f"cannot write {self.where}", "--output-dir"):
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                for key, value in metrics.items():
                    sink.add_scalar(f"train/{key}", value, step)
            else:
                sink.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        for kind, sink in self.sinks:
            sink.close() if kind == "tensorboard" else sink.finish()
