"""GRPO rollouts: our grpo stage (rollouts on the native engine over the policy's weights) against upstream-style
rollouts (HF `generate` on the same model object, as upstream MiniMind's train_grpo.py samples), in one run.

Both run the same trainer loop, stage and loss (training/grpo.py) from the same random model of a preset shape,
on the same prompts: only the rollout differs. The HF side subclasses the stage and replaces its `rollout` with
one batched `model.generate(do_sample=True, output_scores=True)` over all prompts x G, the sampling
log-probabilities taken from the returned (processed) scores, under the trainer's autocast. A random model rarely
samples EOS, so completions run to about `--max-new-tokens`, the same work for both; tokens/s counts the tokens
actually generated. Reported per system: rollout tokens/s, rollout and whole-step time (mean over the timed
steps after `--warmup`), and peak GPU memory.

    python benchmarks/bench_grpo_rollout.py --preset minimind2-small --max-new-tokens 1024 \\
        --out benchmarks/results/grpo-rollout-h200.json
    python benchmarks/bench_grpo_rollout.py --preset tiny --max-new-tokens 32 --steps 2   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from training.dpo import eval_mode  # noqa: E402
from training.grpo import CISPO_DEFAULT_CAP, GRPOStage  # noqa: E402
from training.rollout import Completion, Trajectory  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineRollouts(GRPOStage):
    """Our grpo stage as `minimind train grpo` runs it, its rollouts timed."""

    def setup(self, context: Any) -> None:
        super().setup(context)
        self.model, self.rollout_times, self.rollout_tokens = context.model, [], []

    def rollout(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return self.timed(lambda: super(EngineRollouts, self).rollout(items, tokenizer))

    def timed(self, make_batch: Any) -> dict[str, torch.Tensor]:
        """Wall time and generated tokens of a rollout (the device synchronised on both ends)."""
        device = next(self.model.parameters()).device
        sync(device)
        start = time.perf_counter()
        batch = make_batch()
        sync(device)
        self.rollout_times.append(time.perf_counter() - start)
        self.rollout_tokens.append(int((batch["targets"] != -100).sum()))
        return batch


class GenerateRollouts(EngineRollouts):
    """The same stage with upstream-style rollouts: one HF `generate` call over prompts x G."""

    def setup(self, context: Any) -> None:  # grpo's setup without the engine (no KV cache held beside HF's)
        cfg = self.cfg = context.cfg
        self.rewards.to(context.device)
        self.reference = None
        self.epsilon_high = cfg.epsilon_high or (CISPO_DEFAULT_CAP if cfg.rl_loss == "cispo" else cfg.epsilon)
        self.model, self.amp_dtype = context.model, context.amp_dtype
        self.rollout_times, self.rollout_tokens = [], []

    def rollout(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        def make_batch() -> dict[str, torch.Tensor]:
            start = time.perf_counter()
            trajectories = self.generate(items, tokenizer)
            return self.scored_batch(trajectories, items, tokenizer, time.perf_counter() - start)

        return self.timed(make_batch)

    def generate(self, items: list[dict[str, Any]], tokenizer: Any) -> list[Trajectory]:
        cfg, model = self.cfg, self.model
        device = next(model.parameters()).device
        prompts = [item["prompt_ids"] for item in items for _ in range(cfg.num_generations)]
        if len({len(p) for p in prompts}) != 1:
            raise SystemExit("the benchmark prompts must have one length (no padding on the HF side)")
        input_ids = torch.tensor(prompts, device=device)
        with eval_mode(model), torch.no_grad(), torch.autocast(device.type, self.amp_dtype or torch.float32,
                                                                enabled=self.amp_dtype is not None):  # fmt: skip
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=cfg.rollout_temperature,
                top_p=cfg.rollout_top_p,
                top_k=0,
                max_new_tokens=cfg.max_completion_len,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[:, input_ids.shape[1] :]
        logps = torch.stack(
            [s.float().log_softmax(-1).gather(-1, new[:, t : t + 1])[:, 0] for t, s in enumerate(out.scores)], 1
        )
        trajectories = []
        for row in range(len(prompts)):
            ids = new[row].tolist()
            ends = [i for i, token in enumerate(ids) if token == tokenizer.eos_token_id]
            length = ends[0] + 1 if ends else len(ids)
            finish = "stop" if ends else "length"
            completion = Completion(row // cfg.num_generations, ids[:length], logps[row, :length].tolist(),
                                    tokenizer.decode(ids[:length], skip_special_tokens=True), finish)  # fmt: skip
            trajectory = Trajectory.start(completion.prompt_index, prompts[row])
            trajectory.add_model_turn(completion)
            trajectories.append(trajectory)
        return trajectories


def write_prompts(path: Path, count: int) -> Path:
    """Addition questions of one token length ("What is 3 + 4?"): the HF side needs no padding."""
    rows = [
        {
            "messages": [{"role": "user", "content": f"What is {n % 10} + {n * 7 % 10}?"}],
            "answer": str(n % 10 + n * 7 % 10),
        }
        for n in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(stage: EngineRollouts, model_dir: Path, data: Path, args: argparse.Namespace, scratch: Path) -> dict:
    from training.config import TrainConfig
    from training.trainer import Trainer

    cfg = TrainConfig(
        stage="grpo",
        init_from=str(model_dir),
        data_path=str(data),
        max_seq_len=64 + args.max_new_tokens,
        max_completion_len=args.max_new_tokens,
        batch_size=args.prompts,
        num_generations=args.num_generations,
        max_steps=10**6,
        lr=1e-6,
        warmup_steps=1,
        beta=args.beta,
        rl_loss="grpo",
        rewards={"numeric_match": 1.0},
        rollout_kv_cache_mb=args.kv_cache_mb,
        device=args.device,
        report_to="none",
        output_dir=str(scratch / type(stage).__name__),
    )
    trainer = Trainer(cfg, stage)
    trainer.setup()
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        trainer.train_step(step)
        sync(device)
        step_times.append(time.perf_counter() - start)
    timed = slice(args.warmup, None)
    rollout_s, tokens = sum(stage.rollout_times[timed]), sum(stage.rollout_tokens[timed])
    row = {
        "system": "minimind grpo stage (native engine rollouts)"
        if type(stage) is EngineRollouts
        else "upstream-style rollouts (HF generate, same stage and model)",
        "model_class": type(trainer.model).__name__,
        "rollout_tokens_per_s": round(tokens / rollout_s, 1),
        "rollout_s": round(rollout_s / args.steps, 3),
        "step_s": round(sum(step_times[timed]) / args.steps, 3),
        "tokens_per_step": round(tokens / args.steps, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="minimind2-small", help="a models/presets.py shape, or tiny (CPU check)")
    parser.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/upstream-minimind/minimind3-dense"))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (each sampled G times)")
    parser.add_argument("--num-generations", type=int, default=6, help="G (default: 6)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--beta", type=float, default=0.0, help="KL to a reference (0: no reference, as timed)")
    parser.add_argument("--kv-cache-mb", type=int, default=2048, help="our rollout engine's KV cache (MiB)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", help="JSON file for the record (e.g. benchmarks/results/grpo-rollout-h200.json)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from models.config import MiniMindConfig
    from models.model import MiniMindForCausalLM
    from models.presets import PRESETS

    scratch = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = TINY if args.preset == "tiny" else PRESETS[args.preset]
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**{**shape, "vocab_size": len(tokenizer)}))
    model.save_pretrained(scratch / "model")
    tokenizer.save_pretrained(scratch / "model")
    del model
    data = write_prompts(scratch / "prompts.jsonl", 4 * args.prompts)
    results = {**provenance(__file__), "preset": args.preset, "settings": vars(args), "rows": []}
    for stage in (EngineRollouts(), GenerateRollouts()):
        row = run(stage, scratch / "model", data, args, scratch)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    ours, hf = results["rows"]
    results["rollout_speedup_vs_hf_generate"] = round(ours["rollout_tokens_per_s"] / hf["rollout_tokens_per_s"], 2)
    results["step_speedup_vs_hf_generate"] = round(hf["step_s"] / ours["step_s"], 2)
    print(
        f"rollouts: ours {ours['rollout_tokens_per_s']} tok/s, HF generate {hf['rollout_tokens_per_s']} tok/s "
        f"({results['rollout_speedup_vs_hf_generate']}x); step {ours['step_s']} s vs {hf['step_s']} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
