"""Where training metrics go: metrics.jsonl in the run directory (always), plus TensorBoard, wandb or swanlab.

metrics.jsonl is the plain record that tests, plots and resumed runs read; the others are optional viewers,
imported only when asked for so a missing package fails with the install command instead of at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.errors import TrainingError, os_errors


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
