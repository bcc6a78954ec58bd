"""DPO training step: our `dpo` stage (what `minimind train` runs) against TRL's `DPOTrainer`, same model shape,
same data, same batch, same beta, in one run.

Both start from the same random model of a preset shape: ours trains the saved MiniMind directory through
`Trainer.train_step` (bf16 autocast, fused AdamW, clip 1.0); TRL trains transformers' own class loaded from the
exported directory (`minimind convert --to auto`) with `DPOConfig(bf16=True)`, as a TRL user of our checkpoint
would. Data: `--pairs` synthetic preference pairs (a prompt and two answers of random words, `--words` each),
tokenized by each side itself before timing. Pairs/s and tokens/s count the timed steps after `--warmup` steps.

    python benchmarks/bench_dpo.py --preset minimind2-small --out benchmarks/results/dpo-h200.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402

WORDS = "the a model reads text and learns to predict next word from data small large fast slow good bad".split()


def make_pairs(path: Path, count: int, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = [{"prompt": text(words // 2), "chosen": text(words), "rejected": text(words)} for _ in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(model_dir: Path, data: Path, args: argparse.Namespace, scratch: Path) -> dict:
    from training.config import TrainConfig
    from training.stages import get_stage
    from training.trainer import Trainer

    cfg = TrainConfig(
        stage="dpo",
        init_from=str(model_dir),
        data_path=str(data),
        max_seq_len=args.max_len,
        batch_size=args.batch,
        max_steps=10**6,
        lr=1e-6,
        warmup_steps=1,
        beta=0.1,
        device=args.device,
        compile=args.compile,
        report_to="none",
        output_dir=str(scratch / "ours"),
    )
    trainer = Trainer(cfg, get_stage("dpo"))
    trainer.setup()
    device = trainer.device
    for step in range(args.warmup):
        trainer.train_step(step)
    sync(device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        stats = trainer.train_step(step)
    sync(device)
    elapsed = time.perf_counter() - start
    row = {
        "system": "minimind dpo stage" + (" (--compile)" if args.compile else ""),
        "model_class": type(trainer.model).__name__,
        "pairs_per_s": round(args.steps * args.batch / elapsed, 1),
        "tokens_per_s": round(stats.positions * args.steps / elapsed),
        "step_ms": round(elapsed / args.steps * 1e3, 1),
        "last_loss": round(stats.loss, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def trl(exported: Path, data: Path, args: argparse.Namespace, scratch: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync(device)
            times.append(time.perf_counter())

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    policy = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(scratch / "trl"),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        beta=0.1,
        bf16=cuda,
        use_cpu=not cuda,
        max_length=args.max_len,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    elapsed = times[-1] - times[args.warmup - 1]
    row = {
        "system": "TRL DPOTrainer",
        "model_class": type(policy).__name__,
        "pairs_per_s": round(args.steps * args.batch / elapsed, 1),
        "step_ms": round(elapsed / args.steps * 1e3, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }
    del trainer, policy, reference
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/upstream-minimind/minimind3-dense"))
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--words", type=int, default=100, help="words per answer (the prompt has half as many)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time our stage with --compile")
    parser.add_argument("--out")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from models.config import MiniMindConfig
    from models.convert import convert
    from models.model import MiniMindForCausalLM
    from models.presets import PRESETS

    scratch = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**{**PRESETS[args.preset], "vocab_size": 6400}))
    model.save_pretrained(scratch / "minimind")
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(scratch / "minimind")
    exported, target = convert(scratch / "minimind", scratch / "hf", "auto")
    data = make_pairs(scratch / "pairs.jsonl", args.pairs, args.words)
    results = {**provenance(__file__), "preset": args.preset, "hf_target": target, "settings": vars(args), "rows": []}
    runs = [lambda: ours(scratch / "minimind", data, args, scratch), lambda: trl(exported, data, args, scratch)]
    for run in runs:
        row = run()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.compile:
        args.compile = False  # the eager stage too, for the record
        results["rows"].append(ours(scratch / "minimind", data, args, scratch))
        print(json.dumps(results["rows"][-1]), flush=True)
    mine, theirs = results["rows"][0], results["rows"][1]
    results["speedup_vs_trl"] = round(mine["pairs_per_s"] / theirs["pairs_per_s"], 2)
    print(f"ours {mine['pairs_per_s']} pairs/s, TRL {theirs['pairs_per_s']} pairs/s: {results['speedup_vs_trl']}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
