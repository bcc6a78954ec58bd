"""Host time of one native-engine decode step, with the model and the sampler replaced by stand-ins.

With a small model on a GPU a decode step is bound by the host: the GPU finishes its part quickly, and the step
takes as long as the engine's own Python for every row (scheduling, committing the sampled tokens, detokenizing,
building the deltas the server streams). This script times that part alone. The model's forward returns fixed
logits and the sampler returns fixed tokens, so the figure does not depend on the device and can be measured on
any CPU. Sequences sample at temperature 1.0 with EOS ignored and detokenize their output, as `vllm bench serve`'s
requests do.

    python benchmarks/bench_engine_host.py [--rows 64 256] [--steps 40] [--repeats 5] [--out FILE]

Prints the best and median time per step for each batch size and saves JSON (default:
benchmarks/results/engine-host-step-<machine>.json). Not a test: timings vary with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import machine_name, provenance  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling import SamplerOutput  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

PROMPT_LEN = 128


def tiny_llm(max_rows: int) -> LLM:
    """The test suite's tiny random model (2 layers, tests/conftest.py) on the CPU with the real minimind3
    tokenizer: the model's size does not enter the figure. A longer context than the tests' lets many steps run."""
    from transformers import AutoTokenizer

    from tests.conftest import UPSTREAM_FIXTURES, tiny_model

    tokenizer = AutoTokenizer.from_pretrained(UPSTREAM_FIXTURES / "minimind3-dense")
    model = tiny_model(max_position_embeddings=2048)
    return LLM(model, tokenizer=tokenizer, max_num_seqs=max_rows, device="cpu")


def time_rows(rows: int, steps: int, repeats: int) -> dict:
    """Start `rows` sequences, swap in the stand-ins, time `repeats` runs of `steps` decode steps."""
    llm = tiny_llm(rows)
    core = llm.engine
    rng = random.Random(0)
    vocab = llm.model.config.vocab_size
    params = SamplingParams(max_tokens=(steps * (repeats + 1) + 16), ignore_eos=True, temperature=1.0)
    for i in range(rows):
        core.add_request(f"r{i}", [rng.randrange(10, vocab) for _ in range(PROMPT_LEN)], params, None, None)
    while core.scheduler.waiting:
        core.step()
    logits = torch.zeros(rows, vocab)
    tokens = torch.randint(10, vocab, (rows,), generator=torch.Generator().manual_seed(0))
    core.runner.step = lambda slots, ids, starts: logits[: len(slots), None]
    core.sampler = lambda seqs, scores: SamplerOutput(tokens[: len(seqs)].clone())
    for _ in range(steps // 4):
        core.step()
    per_step = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            core.step()
        per_step.append((time.perf_counter() - started) / steps * 1e6)
    if len(core.scheduler.running) != rows:
        raise RuntimeError(f"{len(core.scheduler.running)} of {rows} sequences still running: raise max_tokens")
    return {
        "rows": rows,
        "best_us": min(per_step),
        "median_us": statistics.median(per_step),
        "best_us_per_row": min(per_step) / rows,
        "runs_us": per_step,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256], help="running sequences per step")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (best and median kept)")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/engine-host-step-...)")
    args = parser.parse_args(argv)
    for flag, values in (("--rows", args.rows), ("--steps", [args.steps]), ("--repeats", [args.repeats])):
        if any(n < 1 for n in values):
            parser.error(f"{flag} must be 1 or more, got {' '.join(map(str, values))}")
    return args


def main() -> None:
    args = parse_args()
    results = []
    for rows in args.rows:
        result = time_rows(rows, args.steps, args.repeats)
        results.append(result)
        print(
            f"{rows:4d} rows: best {result['best_us']:8.0f} us per step ({result['best_us_per_row']:.2f} us per row), "
            f"median {result['median_us']:8.0f} us",
            flush=True,
        )
    slug = re.sub(r"[^a-z0-9]+", "-", machine_name().lower()).strip("-")
    out = args.out or ROOT / "benchmarks" / "results" / f"engine-host-step-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**provenance(__file__), "steps": args.steps, "repeats": args.repeats, "results": results}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print("saved", out)


if __name__ == "__main__":
    main()
