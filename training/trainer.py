"""The training loop, shared by every stage: devices, precision, accumulation, clipping, schedule, logging,
checkpoints and resume, DDP/FSDP. A stage (training/stages.py) only supplies data, collate, loss and saving.

Loss scaling: each micro-batch's loss is the stage's summed loss divided by the stage's count (trained tokens,
pairs, ...) of the whole optimizer step (all micro-batches, all processes), so every unit weighs the same and
batch 8 x 1 equals batch 2 x 4. The sample order is a pure function of (seed, position), so the data position saved in a
checkpoint is just the step number, and a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from training.checkpoint import (
    check_world,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import TrainConfig
from training.errors import TrainingError, os_errors
from training.reporting import MetricWindow, Reporter, StepStats, flops_per_token, peak_flops
from training.setup import build_model, compile_model, param_groups, precision, setup_distributed
from training.stages import StageContext

log = logging.getLogger("minimind.train")
DATA_WAIT = datetime.timedelta(hours=4)  # longest wait for rank 0 to tokenize the data set


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to lr * min_lr_ratio at the last step (a pure function of step)."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class SampleOrder:
    """Global sample positions 0, 1, 2, ... mapped to dataset indices through one seeded permutation per epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self._perms = size, seed, {}

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][offset])


class Trainer:
    def __init__(self, cfg: TrainConfig, stage: Any) -> None:
        self.cfg, self.stage = cfg, stage
        self.rank, self.local_rank, self.world, self.device = setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.amp_dtype, use_scaler = precision(cfg.dtype, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.run_dir = cfg.resolved_output_dir()
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        self.cpu_group = None  # a gloo group for the small host-side all-reduces (token counts)
        self.data_group = None  # a gloo group the other ranks wait on while rank 0 tokenizes the data
        if dist.is_initialized():
            self.cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
            # Tokenizing a large JSONL takes longer than the default collective timeout (NCCL's 10 minutes:
            # upstream's sft_mini_512 is ~9 minutes on one process), so the wait has its own, long timeout.
            self.data_group = dist.new_group(backend="gloo", timeout=DATA_WAIT)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def wait_for_data(self) -> None:
        if self.data_group is not None:
            dist.barrier(group=self.data_group)

    def setup(self) -> None:
        from models.loader import load_tokenizer

        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + self.rank)
        if self.is_main:
            self.prepare_run_dir()
        tokenizer_dir = cfg.tokenizer or cfg.init_from
        if not tokenizer_dir:
            raise TrainingError("no tokenizer: set tokenizer: (a directory with tokenizer.json) or init_from:")
        source = Path(tokenizer_dir).expanduser()
        self.tokenizer = load_tokenizer(source.parent if source.is_file() else source)
        if not cfg.data_files:
            raise TrainingError("data_path is empty: give a JSONL file (--data-path FILE.jsonl)")
        if not self.is_main:  # rank 0 tokenizes into the cache, the others then read it
            self.wait_for_data()
        self.dataset = self.stage.build_dataset(cfg, self.tokenizer)
        if self.is_main:
            self.wait_for_data()
        self.order = SampleOrder(len(self.dataset), cfg.seed)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.dataset) / self.global_batch))

        model = self.stage.prepare_model(build_model(cfg, self.tokenizer), cfg)
        self.config = model.config
        self.num_params = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model.to(self.device)  # the module whose state is saved (same parameters as the wrapper)
        # before wrapping (a reference copy must not be a shard) and before resume (it is the start weights)
        context = StageContext(self.model, cfg, self.tokenizer, self.device, self.amp_dtype, self.dataset, self.is_main)
        self.stage.setup(context)
        self.wrapped = self.wrap(self.model)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused
        )
        if cfg.compile:
            compile_model(self.model, self.stage, cfg.compile_scope, cfg.compile_mode)
        self.start_step, self.tokens_seen = 0, 0
        self.resume()

    def prepare_run_dir(self) -> None:
        """Fail now, not after tokenizing and training, when the run directory cannot be written; and remove the
        partial checkpoints a killed or disk-full run left (they would hold the space the next save needs)."""
        probe = self.run_dir / f".write-test-{os.getpid()}"
        with os_errors(f"cannot write to the run directory {self.run_dir}", "--output-dir"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
            for stale in remove_stale_temporaries(self.run_dir):
                log.info("removed %s, left by an interrupted save", stale)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32)
            for layer in model.model.layers:
                fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def full_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Unsharded model and optimizer state on CPU (a collective under torchrun: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
        return get_state_dict(self.model, self.optimizer, options=options)

    def resume(self) -> None:
        path = resolve_resume(self.run_dir, self.cfg.resume)
        if path is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        saved = load_checkpoint(path)
        same_world = check_world(saved, self.world, self.global_batch)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=saved["model"],
            optim_state_dict=saved["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        self.scaler.load_state_dict(saved["scaler"])
        self.start_step, self.tokens_seen = saved["step"], saved["tokens_seen"]
        if same_world:
            set_rng_state(saved["rng"][self.rank])
        else:  # new process count, same global batch: same data order, fresh (seeded) dropout streams
            torch.manual_seed(self.cfg.seed + 1000003 * self.start_step + self.rank)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.start_step)

    def save(self, step: int) -> None:
        model_state, optim_state = self.full_state()
        rngs = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.is_main:
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict(),
                "step": step,
                "tokens_seen": self.tokens_seen,
                "rng": rngs,
                "world_size": self.world,
                "global_batch": self.global_batch,
            }
            save_checkpoint(self.run_dir, step, state, yaml.safe_dump(self.cfg.to_dict()), self.cfg.keep_last)
        self.barrier()

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's grad_accum micro-batches of optimizer step `step` (positions step*G ... step*G+G-1)."""
        cfg, base = self.cfg, step * self.global_batch
        batches = []
        for micro in range(cfg.grad_accum):
            first = base + (micro * self.world + self.rank) * cfg.batch_size
            items = [self.dataset[self.order(first + i)] for i in range(cfg.batch_size)]
            batches.append(self.stage.collate(items, self.tokenizer))
        return batches

    def sync_context(self, last_micro: bool) -> Any:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.world > 1 and self.cfg.distributed == "ddp" and not last_micro:
            return self.wrapped.no_sync()
        if self.world > 1 and self.cfg.distributed == "fsdp":
            self.wrapped.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host-to-GPU copies from pinned memory, so they never make the CPU wait for the GPU to catch up."""
        if self.device.type != "cuda":
            return batch
        return {key: value.pin_memory().to(self.device, non_blocking=True) for key, value in batch.items()}

    def step_count(self, batches: list[dict[str, torch.Tensor]]) -> int:
        """The stage's count over the whole step: every rank needs it before its first backward. Summed on the
        CPU (gloo), so it costs no GPU synchronisation."""
        count = sum(self.stage.count(batch) for batch in batches)
        if dist.is_initialized():
            counted = torch.tensor([count], dtype=torch.int64)
            dist.all_reduce(counted, group=self.cpu_group)
            count = int(counted)
        return count

    def autocast(self) -> Any:
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled)

    def train_step(self, step: int) -> StepStats:
        """One optimizer step. Nothing here waits for the GPU (no .item(), no copies from pageable memory), so
        the CPU prepares and launches step N+1 while the GPU still runs step N."""
        batches = self.micro_batches(step)
        count = self.step_count(batches)
        denom = max(count, 1) / self.world  # DDP/FSDP average gradients over ranks; undo that
        lr = lr_at(step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        positions = sum(batch["input_ids"].numel() for batch in batches) * self.world
        stats = StepStats(torch.zeros((), device=self.device), count, positions)
        for n, batch in enumerate(batches):
            batch = self.to_device(batch)
            with self.sync_context(n == len(batches) - 1):
                with self.autocast():
                    out = self.stage.loss(self.wrapped, batch)
                loss = out.loss_sum / denom
                if out.aux is not None:
                    loss = loss + out.aux / len(batches)
                self.scaler.scale(loss).backward()
            stats.loss_sum += out.loss_sum.detach()
            for key, value in out.metrics.items():
                stats.metrics[key] = stats.metrics.get(key, 0) + value.detach().float()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def start_run(self) -> Reporter:
        """Write config.yaml, open the metrics sinks and say what is about to run."""
        cfg = self.cfg
        if self.is_main:
            with os_errors(f"cannot write {self.run_dir / 'config.yaml'}", "--output-dir"):
                cfg.save(self.run_dir / "config.yaml")
            if self.dataset.bad_lines:
                log.warning("skipped %d bad line(s) in %s (--skip-bad-lines)", self.dataset.bad_lines, cfg.data_path)
        reporter = Reporter(self.run_dir, cfg.report_to, cfg.run_name, cfg.to_dict(), self.is_main)
        if self.is_main:
            reporter.log(
                self.start_step, {"bad_lines": float(self.dataset.bad_lines), "samples": float(len(self.dataset))}
            )
            log.info(
                "%s: %d samples, %d steps, %.1fM parameters (%.2fM trained), global batch %d x %d tokens, %s",
                cfg.stage,
                len(self.dataset),
                self.total_steps,
                self.num_params / 1e6,
                self.trainable / 1e6,
                self.global_batch,
                cfg.max_seq_len,
                self.device,
            )
        return reporter

    def window_metrics(self, window: MetricWindow) -> dict[str, float]:
        """The log line: the stage's loss and metrics (means since the last log), lr, throughput, MFU."""
        values, speed = window.flush()
        metrics = {"loss": values.pop("loss"), "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": speed}
        if self.cfg.grad_clip > 0:
            metrics["grad_norm"] = float(self.grad_norm)
        peak = peak_flops(self.device)
        if peak:
            per_token = flops_per_token(
                self.num_params, self.config.num_hidden_layers, self.config.hidden_size, self.cfg.max_seq_len
            )
            metrics["mfu"] = speed * per_token / (peak * self.world)
        return {**metrics, **values}

    def run(self) -> Path:
        """Train to total_steps (resuming if a checkpoint exists) and write the final model; returns its path."""
        from tqdm import tqdm

        self.setup()
        cfg = self.cfg
        reporter = self.start_run()
        bar = tqdm(
            total=self.total_steps, initial=self.start_step, disable=not self.is_main, dynamic_ncols=True, unit="step"
        )
        window = MetricWindow()
        self.wrapped.train()
        for step in range(self.start_step, self.total_steps):
            stats = self.train_step(step)
            window.add(stats)
            self.tokens_seen += stats.positions
            done = step + 1
            if done % cfg.log_every == 0 or done == self.total_steps:
                metrics = self.window_metrics(window)
                reporter.log(done, metrics)
                bar.set_postfix(progress_fields(metrics))
            bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps:
                self.save(done)
        bar.close()
        self.save(self.total_steps)
        final = self.run_dir / "final"
        self.save_final(final)
        reporter.close()
        if self.is_main:
            log.info("final model written to %s", final)
        if dist.is_initialized():
            dist.destroy_process_group()
        return final

    def save_final(self, out_dir: Path) -> None:
        """Gather the full weights, rebuild an unwrapped CPU copy and let the stage save it (HF dir, .pth, adapter)."""
        model_state, _ = self.full_state()
        if self.is_main:
            model_state = {key: value.detach().cpu().clone() for key, value in model_state.items()}
            from models.model import MiniMindForCausalLM

            model_class = MiniMindForCausalLM
            if self.config.model_type == "minimind_vlm":
                from models.vision import MiniMindVLMForCausalLM as model_class
            with torch.device("meta"):
                final = self.stage.prepare_model(model_class(self.config), self.cfg)
            final.load_state_dict(model_state, strict=False, assign=True)
            if self.config.tie_word_embeddings:
                final.lm_head.weight = final.model.embed_tokens.weight
            self.stage.save_final(final.float().eval(), self.tokenizer, self.cfg, out_dir)
        self.barrier()


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's postfix: every logged number, compactly formatted."""
    shown = {}
    for key, value in metrics.items():
        if key == "grad_norm":
            continue
        if key == "lr":
            shown[key] = f"{value:.2e}"
        elif key == "tokens_per_s":
            shown["tok_s"] = f"{value:,.0f}"
        elif key == "mfu" or "accuracy" in key:
            shown[key] = f"{value:.1%}"
        else:
            shown[key] = f"{value:.4f}"
    return shown
