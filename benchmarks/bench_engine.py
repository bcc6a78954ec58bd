"""Native engine vs HF transformers `generate` on the same model, in one run.

The HF baseline is transformers' own architecture class (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...): the model is
saved, converted with `minimind convert --to auto` and loaded with `AutoModelForCausalLM`, as a user of the exported
directory would. The engine loads the saved MiniMind directory (its own copy). `hf_minimind_class_b1_tok_s` is HF
`generate` on our own MiniMind class (what TRL, PEFT and lm-eval users of our checkpoints get), batch 1.

Measures, per model:
- batch-1 decode: greedy, `--new-tokens` (256) new tokens after a short prompt, tok/s (wall time of the whole call);
- batched throughput: N requests (`--batches`, default 64/256/1024) of `--prompt-len` (128) random prompt tokens and
  `--output-len` (128) output tokens, EOS ignored, output tok/s;
- speculative decoding (`--spec`): a 16-layer target and a 2-layer draft trained briefly on the same synthetic
  Markov-chain data (random weights accept nothing), batch-1 speed-up and acceptance rate, greedy identity checked;
  then the same for sampled requests at `--spec-temperature` (0.8).

Results are printed as a table and saved as JSON with the device name, torch version and date. `--time-budget`
bounds the whole run: a section that would start after it is skipped (and marked so in the JSON); HF generate is
skipped above `--hf-max-batch` or when the previous batch suggests it would take over `--hf-max-seconds`.
`--compile` runs decode steps through torch.compile (GPU); `--profile` adds kernels, GPU and host time per step.

    python benchmarks/bench_engine.py --device cuda --preset minimind2-small --preset minimind2 --spec
    python benchmarks/bench_engine.py --device cpu --model default --batches 4 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_profile import profile_decode, profile_hf_generate  # noqa: E402
from benchmarks.plots import save_figure_beside  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from models.config import MiniMindConfig  # noqa: E402
from models.model import MiniMindForCausalLM  # noqa: E402
from models.presets import PRESETS  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return f"{cpu} CPU, {torch.get_num_threads()} threads"


def random_model(preset: str, dtype: torch.dtype, device: str, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    config = MiniMindConfig(**{**PRESETS[preset], "max_position_embeddings": 4096, **overrides})
    return MiniMindForCausalLM(config).to(device=device, dtype=dtype).eval()


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, device: str) -> tuple[float, list[int]]:
    """Seconds for HF greedy generate of exactly new_tokens (EOS off), and the first row's new tokens."""
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    sync(device)
    return time.perf_counter() - start, out[0, prompts.shape[1] :].tolist()


def engine_generate(llm: LLM, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(device)
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return time.perf_counter() - start, outs[0].outputs[0].token_ids


def timed(run, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


class Clock:
    """The run's time budget: sections ask before they start."""

    def __init__(self, budget: float) -> None:
        self.start, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def hf_baseline(model: MiniMindForCausalLM, tokenizer, scratch: Path, device: str):
    """(MiniMind directory for the engine, transformers' own class loaded from the exported directory, its class)."""
    from transformers import AutoModelForCausalLM

    from models.convert import convert

    ours = scratch / "minimind"
    model.save_pretrained(ours)
    tokenizer.save_pretrained(ours)
    exported, target = convert(ours, scratch / "hf", "auto")
    dtype = next(model.parameters()).dtype
    reference = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype).to(device).eval()
    return ours, reference, type(reference).__name__


def greedy_check(source: Path, exported: Path, tokenizer, device: str, prompts: int = 4, new_tokens: int = 32) -> dict:
    """float32 greedy output of the engine (its own copy, fused projections on a GPU) against transformers' own class
    loaded from the exported directory: in float32 a near-tie cannot flip, so every token must match."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).to(device).eval()
    llm = LLM(source, tokenizer=tokenizer, dtype=torch.float32, device=device, max_model_len=64, max_num_seqs=prompts)
    gen = torch.Generator().manual_seed(5)
    rows = torch.randint(10, reference.config.vocab_size, (prompts, 16), generator=gen)
    outs = llm.generate(rows.tolist(), SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    identical = sum(
        out.outputs[0].token_ids == hf_generate(reference, row[None].to(device), new_tokens, device)[1]
        for out, row in zip(outs, rows)
    )
    del llm, reference
    return {"dtype": "float32", "prompts": prompts, "new_tokens": new_tokens, "identical_prompts": identical}


def hf_tokens_for(args) -> int:
    return args.hf_new_tokens or args.new_tokens


def bench_model(name: str, model, tokenizer, args, device: str, clock: Clock) -> dict:
    """The engine loads `model` saved as a MiniMind directory (its own copy, laid out its own way); HF generate runs
    transformers' own class loaded from the exported directory, and our class (a fresh copy) at batch 1."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    short = torch.randint(10, vocab, (1, 16), generator=gen)
    row: dict = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    max_len = args.prompt_len + args.output_len + args.new_tokens + 16
    scratch = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    source, reference, row["hf_class"] = hf_baseline(model, tokenizer, scratch, device)
    ours_class = model  # our class, never handed to the engine
    model = reference
    if not args.skip_hf:  # both HF classes alone on the GPU, before the engine takes its KV cache memory
        hf_generate(model, short.to(device), 8, device)
        hf_generate(ours_class, short.to(device), 8, device)
        row["hf_b1_tok_s_before_engine"] = round(
            hf_tokens_for(args) / hf_generate(model, short.to(device), hf_tokens_for(args), device)[0], 1
        )
        row["hf_minimind_class_b1_tok_s_before_engine"] = round(
            hf_tokens_for(args) / hf_generate(ours_class, short.to(device), hf_tokens_for(args), device)[0], 1
        )
    llm = LLM(
        source,
        tokenizer=tokenizer,
        dtype=next(model.parameters()).dtype,
        device=device,
        max_model_len=max_len,
        max_num_seqs=max(args.batches + [2]),
        compile_model=args.compile,
    )
    # Batch 1 (warm-up first: compilation, graph capture, allocator).
    t0 = time.perf_counter()
    engine_generate(llm, [short[0].tolist()], args.new_tokens, device)
    row["warmup_s"] = round(time.perf_counter() - t0, 1)
    # Engine and HF alternate (rounds), so that a busy spell on a shared machine hits both; the best run counts.
    hf_tokens = hf_tokens_for(args)
    if not args.skip_hf:
        hf_generate(model, short.to(device), 8, device)
        hf_generate(ours_class, short.to(device), 8, device)
    ours_runs, hf_runs, hf_ours_runs = [], [], []
    for _ in range(args.rounds):
        ours_runs.append(engine_generate(llm, [short[0].tolist()], args.new_tokens, device))
        if not args.skip_hf and len(hf_runs) < args.hf_repeats:
            hf_runs.append(hf_generate(model, short.to(device), hf_tokens, device))
            hf_ours_runs.append(hf_generate(ours_class, short.to(device), hf_tokens, device))
    t_ours, ours = min(ours_runs)
    row["engine_b1_tok_s"] = round(args.new_tokens / t_ours, 1)
    if args.profile and device.startswith("cuda"):
        row["profile_b1"] = profile_decode(llm, args.new_tokens, row["engine_b1_tok_s"])
        if not args.skip_hf:
            row["profile_hf_generate"] = {
                row["hf_class"]: profile_hf_generate(model, short.to(device)),
                "MiniMindForCausalLM": profile_hf_generate(ours_class, short.to(device)),
            }
    if args.compile and device.startswith("cuda"):  # the same engine without torch.compile, for comparison
        plain = LLM(
            source, tokenizer=tokenizer, dtype=llm.model.dtype, device=device, max_model_len=max_len, max_num_seqs=2
        )
        engine_generate(plain, [short[0].tolist()], args.new_tokens, device)
        t_plain, _ = min(engine_generate(plain, [short[0].tolist()], args.new_tokens, device) for _ in range(3))
        row["engine_no_compile_b1_tok_s"] = round(args.new_tokens / t_plain, 1)
        if args.profile:
            row["profile_b1_no_compile"] = profile_decode(plain, args.new_tokens, row["engine_no_compile_b1_tok_s"])
        del plain
    if hf_runs:
        t_hf, ref = min(hf_runs)
        row["hf_b1_tok_s"] = round(hf_tokens / t_hf, 1)
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        row["b1_tokens_identical_to_hf"] = same  # leading tokens equal (bf16 may flip a near-tie late)
        row["b1_tokens_compared"] = len(ref)
        t_hf_ours, ref_ours = min(hf_ours_runs)
        row["hf_minimind_class_b1_tok_s"] = round(hf_tokens / t_hf_ours, 1)
        row["b1_minimind_class_tokens_identical_to_hf"] = next(
            (i for i, (a, b) in enumerate(zip(ref_ours, ref)) if a != b), len(ref)
        )
    if not args.skip_hf:
        row["greedy_check"] = greedy_check(source, scratch / "hf", tokenizer, device)
    print(f"[{name}] batch 1: {row}", flush=True)
    hf_seconds: tuple[int, float] | None = None
    for n in args.batches:
        if clock.left() < 20:
            row[f"engine_{n}_out_tok_s"] = "skipped: time budget"
            continue
        prompts = torch.randint(10, vocab, (n, args.prompt_len), generator=gen)
        engine_generate(llm, prompts.tolist(), 4, device)  # warm-up at this batch size (graph capture)
        t_ours, _ = min(engine_generate(llm, prompts.tolist(), args.output_len, device) for _ in range(args.repeats))
        row[f"engine_{n}_out_tok_s"] = round(n * args.output_len / t_ours, 1)
        projected = hf_seconds[1] * n / hf_seconds[0] if hf_seconds else 0.0
        if args.skip_hf:
            pass
        elif n > args.hf_max_batch or projected > args.hf_max_seconds or projected > clock.left() - 30:
            row[f"hf_{n}_out_tok_s"] = f"skipped: projected {projected:.0f} s"
        else:
            t_hf, _ = min(hf_generate(model, prompts.to(device), args.output_len, device) for _ in range(args.repeats))
            row[f"hf_{n}_out_tok_s"] = round(n * args.output_len / t_hf, 1)
            hf_seconds = (n, t_hf)
        print(f"[{name}] {n} requests: {row}", flush=True)
    del llm
    shutil.rmtree(scratch, ignore_errors=True)
    return row


def markov_batch(table: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Token streams from a fixed random Markov chain: the successor is table[token] 80% of the time, else random."""
    vocab = table.shape[0]
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for t in range(1, length):
        follow = torch.rand(batch, generator=gen) < 0.8
        seq[:, t] = torch.where(follow, table[seq[:, t - 1]], torch.randint(0, vocab, (batch,), generator=gen))
    return seq


def train(model, table: torch.Tensor, steps: int, device: str, batch_size: int = 32) -> float:
    gen = torch.Generator().manual_seed(2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = markov_batch(table, batch_size, 128, gen).to(device)
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def bench_spec(tokenizer, args, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    vocab = 6400
    table = torch.randint(0, vocab, (vocab,), generator=torch.Generator().manual_seed(3))
    target = random_model(args.spec_target, torch.float32, device)
    draft = random_model(args.spec_target, torch.float32, device, num_hidden_layers=2)
    t0 = time.perf_counter()
    target_loss = train(target, table, args.spec_steps, device, args.spec_batch)
    draft_loss = train(draft, table, args.spec_steps, device, args.spec_batch)
    train_s = time.perf_counter() - t0
    target, draft = target.to(dtype), draft.to(dtype)
    prompt = markov_batch(table, 1, 16, torch.Generator().manual_seed(4))[0].tolist()
    max_len = 16 + args.new_tokens + 16
    common = dict(tokenizer=tokenizer, device=device, max_model_len=max_len, max_num_seqs=4)
    plain = LLM(target, **common, compile_model=args.spec_compile)
    spec = LLM(target, **common, draft_model=draft, num_speculative_tokens=args.spec_k, compile_model=args.spec_compile)
    engine_generate(plain, [prompt], args.new_tokens, device)
    engine_generate(spec, [prompt], args.new_tokens, device)
    spec.engine.spec.proposed = spec.engine.spec.accepted = 0
    t_plain, out_plain = min(engine_generate(plain, [prompt], args.new_tokens, device) for _ in range(3))
    t_spec, out_spec = min(engine_generate(spec, [prompt], args.new_tokens, device) for _ in range(3))
    row = {
        "target": f"{args.spec_target} ({target.config.num_hidden_layers} layers)",
        "draft_layers": 2,
        "k": args.spec_k,
        "compiled": args.spec_compile,
        "train_steps": args.spec_steps,
        "train_seconds": round(train_s, 1),
        "target_loss": round(target_loss, 3),
        "draft_loss": round(draft_loss, 3),
        "target_alone_tok_s": round(args.new_tokens / t_plain, 1),
        "speculative_tok_s": round(args.new_tokens / t_spec, 1),
        "speedup": round(t_plain / t_spec, 2),
        "acceptance_rate": round(spec.engine.spec.acceptance_rate, 3),
        "greedy_identical": out_plain == out_spec,
    }
    # Sampled requests speculate too (min(1, p/q) acceptance): the same runs at --spec-temperature, seeded.
    sampled = SamplingParams(temperature=args.spec_temperature, seed=0, max_tokens=args.new_tokens, ignore_eos=True)
    spec.engine.spec.proposed = spec.engine.spec.accepted = 0
    t_plain = min(timed(lambda: plain.generate([prompt], sampled), device) for _ in range(3))
    t_spec = min(timed(lambda: spec.generate([prompt], sampled), device) for _ in range(3))
    row["sampled_temperature"] = args.spec_temperature
    row["sampled_speedup"] = round(t_plain / t_spec, 2)
    row["sampled_acceptance_rate"] = round(spec.engine.spec.acceptance_rate, 3)
    print(f"[speculative] {row}", flush=True)
    return row


def save(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    save_figure_beside("engine", results, Path(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", action="append", default=[], help="random-weight model of this preset shape")
    parser.add_argument("--model", help="checkpoint path, or 'default' for the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/upstream-minimind/minimind2-dense"))
    parser.add_argument("--dtype", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    parser.add_argument("--new-tokens", type=int, default=256, help="batch-1 new tokens")
    parser.add_argument("--batches", default="64,256,1024", help="comma-separated request counts ('' = none)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per batch size, each system (best counts)")
    parser.add_argument("--rounds", type=int, default=3, help="timed batch-1 engine runs (the best counts)")
    parser.add_argument("--hf-repeats", type=int, default=1, help="timed HF batch-1 runs, one per round at most")
    parser.add_argument("--hf-new-tokens", type=int, default=None, help="HF batch-1 new tokens (default: same)")
    parser.add_argument("--hf-max-batch", type=int, default=1024, help="largest batch to run HF generate on")
    parser.add_argument("--hf-max-seconds", type=float, default=60, help="skip an HF batch projected to take longer")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds; later sections are skipped")
    parser.add_argument("--compile", action="store_true", help="decode steps through torch.compile (GPU)")
    parser.add_argument("--profile", action="store_true", help="kernels / GPU time / host time per step (GPU)")
    parser.add_argument("--spec-batch", type=int, default=32, help="sequences of 128 tokens per training step")
    parser.add_argument("--spec-compile", action="store_true", help="torch.compile in the speculative section")
    parser.add_argument("--skip-hf", action="store_true", help="only the engine")
    parser.add_argument("--spec", action="store_true", help="also measure speculative decoding")
    parser.add_argument("--spec-target", default="minimind2", help="preset of the speculative target")
    parser.add_argument("--spec-k", type=int, default=4)
    parser.add_argument("--spec-temperature", type=float, default=0.8, help="temperature of the sampled spec run")
    parser.add_argument("--spec-steps", type=int, default=300, help="training steps for target and draft")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    clock = Clock(args.time_budget)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = (
        torch.bfloat16 if (args.dtype or ("bf16" if device.startswith("cuda") else "fp32")) == "bf16" else torch.float32
    )

    import transformers
    from transformers import AutoTokenizer

    results: dict = {
        **provenance(__file__),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": [],
    }
    if args.model:
        from models.loader import load_model

        source = args.model
        if source == "default":
            from models.default_model import default_model_path

            source = default_model_path()
        model, tokenizer = load_model(source, dtype=dtype, device=device)
        results["models"].append(bench_model(Path(source).name, model, tokenizer, args, device, clock))
        del model
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if (args.preset or args.spec) else None
    for preset in args.preset:
        model = random_model(preset, dtype, device)
        results["models"].append(bench_model(preset, model, tokenizer, args, device, clock))
        save(results, args.out)  # partial results survive a later failure
        del model
    if args.spec and clock.left() < 60:
        results["speculative"] = "skipped: time budget"
    elif args.spec:
        results["speculative"] = bench_spec(tokenizer, args, device, dtype)
    save(results, args.out)
    print(f"\n{results['device']}, torch {results['torch']}, {results['date']}, {results['dtype']}")
    keys = sorted({k for m in results["models"] for k in m if k.endswith("tok_s")})
    print("| model | " + " | ".join(keys) + " |")
    for m in results["models"]:
        print(f"| {m['model']} | " + " | ".join(str(m.get(k, "-")) for k in keys) + " |")
    if "speculative" in results:
        print("speculative:", json.dumps(results["speculative"]))
    for m in results["models"]:
        for key in ("profile_b1", "profile_b1_no_compile"):
            if key in m:
                print(f"{m['model']} {key}: {json.dumps(m[key])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
