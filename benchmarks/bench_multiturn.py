"""Multi-turn chat replay and decode throughput for each KV-cache layout of the native engine, in one run.

Multi-turn replay: a conversation of `--turns` (10) turns, as a chat client sends it: every request re-sends the
whole history (a `--system-len` token system prompt, then each earlier user message and reply) plus a new
`--user-len` token user message, and the reply is `--reply-len` greedy tokens. Time to first token (TTFT) of each
turn is measured through `LLM.stream` (the first delta), median over `--conversations` conversations with
different random tokens, after one warm-up conversation (CUDA graph capture, compilation). The goal: turn 10's
TTFT within 1.5x of turn 1's with prefix caching (issue 17), where without it TTFT grows with the history.

Decode throughput: `--batch` requests of `--prompt-len` random tokens and `--output-len` output tokens each (EOS
ignored), output tok/s of the whole call, best of `--repeats`; this is what decides the default layout (the paged
cache gathers each row's blocks in every attention layer, the contiguous one reads a slice).

Layouts: contiguous; paged without prefix caching; paged with prefix caching. Random weights of a preset shape (or
`--tiny`, a CPU-sized model), token ids straight to the engine (no chat template, no tokenizer in the timing).

    python benchmarks/bench_multiturn.py --device cuda --preset minimind2-small --compile
    python benchmarks/bench_multiturn.py --device cpu --tiny --conversations 2 --batch 8 --output-len 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import device_name, random_model, sync  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

LAYOUTS = {
    "contiguous": dict(kv_cache="contiguous"),
    "paged_no_prefix_caching": dict(kv_cache="paged", enable_prefix_caching=False),
    "paged_prefix_caching": dict(kv_cache="paged", enable_prefix_caching=True),
}
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384)


def random_tokens(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=gen).tolist()


def conversation_ttfts(llm: LLM, args, gen: torch.Generator, device: str) -> list[float]:
    """Seconds to the first token of each turn of one conversation whose history is re-sent every turn."""
    vocab = llm.model.config.vocab_size
    history = random_tokens(gen, args.system_len, vocab)
    params = SamplingParams(temperature=0, max_tokens=args.reply_len, ignore_eos=True)
    ttfts = []
    for _ in range(args.turns):
        prompt = history + random_tokens(gen, args.user_len, vocab)
        sync(device)
        start = time.perf_counter()
        reply: list[int] = []
        for delta in llm.stream(prompt, params):
            if not reply and delta.token_ids:
                ttfts.append(time.perf_counter() - start)
            reply += delta.token_ids
        history = prompt + reply
    return ttfts


def decode_throughput(llm: LLM, args, device: str) -> float:
    gen = torch.Generator().manual_seed(1)
    vocab = llm.model.config.vocab_size
    prompts = [random_tokens(gen, args.prompt_len, vocab) for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(4, len(prompts))], params)  # warm-up (graphs, compilation)
    best = 0.0
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync(device)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def bench_layout(model, tokenizer, fields: dict, args, device: str) -> dict:
    llm = LLM(
        model,
        tokenizer=tokenizer,
        device=device,
        max_model_len=args.max_model_len,
        max_num_seqs=max(args.batch, 1),
        compile_model=args.compile,
        **fields,
    )
    conversation_ttfts(llm, args, torch.Generator().manual_seed(999), device)  # warm-up conversation
    runs = [conversation_ttfts(llm, args, torch.Generator().manual_seed(c), device) for c in range(args.conversations)]
    per_turn = [statistics.median(run[t] for run in runs) for t in range(args.turns)]
    stats = llm.engine.stats()
    result = {
        "ttft_ms_per_turn": [round(s * 1000, 3) for s in per_turn],
        "ttft_last_over_first": round(per_turn[-1] / per_turn[0], 3),
        "prefix_cache_hit_rate": round(stats.prefix_cache_hits / stats.prefix_cache_queries, 4)
        if stats.prefix_cache_queries
        else None,
    }
    if args.batch:
        result["decode_output_tok_s"] = round(decode_throughput(llm, args, device), 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="minimind2-small", help="random-weight model of this preset shape")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer, 128-wide model instead (CPU)")
    parser.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/upstream-minimind/minimind2-dense"))
    parser.add_argument("--dtype", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--system-len", type=int, default=256, help="system prompt tokens")
    parser.add_argument("--user-len", type=int, default=64, help="tokens of each user message")
    parser.add_argument("--reply-len", type=int, default=64, help="tokens of each reply")
    parser.add_argument("--conversations", type=int, default=5, help="timed conversations (median per turn)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256, help="requests in the decode throughput run (0 = skip)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ",".join(LAYOUTS))
    parser.add_argument("--compile", action="store_true", help="decode steps through torch.compile (GPU)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/multiturn-<date>.json)")
    args = parser.parse_args()
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = TINY if args.tiny else {}
    model = random_model(args.preset, dtype, device, **shape)
    results = {
        **provenance(__file__),
        "device": device_name(device),
        "model": "tiny" if args.tiny else args.preset,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tokenizer")},
        "layouts": {},
    }
    for name in args.layouts.split(","):
        results["layouts"][name] = bench_layout(model, tokenizer, LAYOUTS[name], args, device)
        row = results["layouts"][name]
        print(
            f"{name:26s} TTFT turn 1 {row['ttft_ms_per_turn'][0]:8.2f} ms, turn {args.turns} "
            f"{row['ttft_ms_per_turn'][-1]:8.2f} ms ({row['ttft_last_over_first']:.2f}x), prefix hits "
            f"{row['prefix_cache_hit_rate']}, decode {row.get('decode_output_tok_s', '-')} tok/s",
            flush=True,
        )
    out = args.out or str(ROOT / "benchmarks" / "results" / f"multiturn-{time.strftime('%Y-%m-%d')}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
