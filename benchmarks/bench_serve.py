"""Load benchmark for a running OpenAI-compatible server: a concurrency sweep with vLLM's serving metrics.

    python benchmarks/bench_serve.py --base-url http://127.0.0.1:8998 --concurrency 1 16 64 256

For each concurrency level, `--num-prompts` streaming /v1/completions requests (fixed output length,
ignore_eos) run with at most that many in flight. Metrics as `vllm bench serve` defines them:
  TTFT  time from sending a request to its first output token
  TPOT  per request, (latency - TTFT) / (output tokens - 1): the mean time per output token after the first
  ITL   every gap between consecutive streamed chunks, across all requests
  E2EL  time from sending to the last token
  output throughput = all output tokens / wall time of the level; request throughput likewise
Results (mean/median/p99 in ms) are printed and saved as JSON under benchmarks/results/ with the machine named.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plots import save_figure_beside  # noqa: E402
from benchmarks.provenance import machine_name, provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, payload: dict, headers: dict) -> RequestResult:
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = await response.aread()
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {body[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(ok=False, error=chunk["error"].get("message", "error event"))
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no output tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def warm_client(base_url: str) -> None:
    """One untimed async GET /health, so that the client's own first async request (httpx/anyio set-up: 27 ms
    against 3 ms after it, measured here against a live server) is not counted as the server's. /health is what
    the start-up polling already asked many times, so the server gains nothing from it."""

    async def get() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            (await client.get(base_url + "/health")).raise_for_status()

    asyncio.run(get())


def first_token_ms(base_url: str, model: str, prompt: str, max_tokens: int) -> float:
    """One streamed completion on a fresh connection (a client of its own); milliseconds to its first text."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(ignore_eos=True, stream_options={"include_usage": True})

    async def one() -> RequestResult:
        async with httpx.AsyncClient(timeout=120) as client:
            return await one_request(client, base_url + "/v1/completions", body, {})

    result = asyncio.run(one())
    if not result.ok:
        raise RuntimeError(f"the request failed: {result.error}")
    return result.ttft * 1e3


def summarize(values: list[float]) -> dict[str, float]:
    """mean / median / p99 / std in milliseconds (vLLM's summary)."""
    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0, "std_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "mean_ms": 1000 * statistics.fmean(values),
        "median_ms": 1000 * statistics.median(values),
        "p99_ms": 1000 * p99,
        "std_ms": 1000 * (statistics.pstdev(values) if len(values) > 1 else 0.0),
    }


async def run_level(args: argparse.Namespace, model: str, concurrency: int) -> dict:
    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * max(1, args.input_len // 10))
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": args.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    num_prompts = args.num_prompts or max(2 * concurrency, 8)
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:

        async def limited() -> RequestResult:
            async with semaphore:
                return await one_request(client, url, payload, headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited() for _ in range(num_prompts)))
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": output_tokens,
        "request_throughput_rps": len(ok) / duration,
        "output_throughput_tok_s": output_tokens / duration,
        "ttft": summarize([r.ttft for r in ok]),
        "tpot": summarize(tpot),
        "itl": summarize([gap for r in ok for gap in r.itl]),
        "e2el": summarize([r.latency for r in ok]),
    }


async def main_async(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=30) as client:
        models = (await client.get(args.base_url.rstrip("/") + "/v1/models", headers=headers)).json()
    model = args.model or models["data"][0]["id"]
    levels = []
    for concurrency in args.concurrency:
        level = await run_level(args, model, concurrency)
        levels.append(level)
        print(
            f"concurrency {concurrency:>4}: {level['completed']}/{level['num_prompts']} ok, "
            f"output {level['output_throughput_tok_s']:.1f} tok/s, "
            f"TTFT median {level['ttft']['median_ms']:.1f} ms, TPOT median {level['tpot']['median_ms']:.2f} ms, "
            f"ITL median {level['itl']['median_ms']:.2f} ms",
            flush=True,
        )
    return {
        "benchmark": "serve",
        **provenance(__file__),
        "machine": args.machine or machine_name(),
        "backend": args.label,
        "model": model,
        "base_url": args.base_url,
        "input_len_words": args.input_len,
        "output_len": args.output_len,
        "levels": levels,
        "note": args.note,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8998", help="server address, without /v1")
    parser.add_argument("--model", help="model id to request (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", help="key for servers started with --api-key")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256], help="streams in flight")
    parser.add_argument("--num-prompts", type=int, help="requests per level (default: 2 x concurrency, at least 8)")
    parser.add_argument("--input-len", type=int, default=100, help="prompt length in words (about as many tokens)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request (ignore_eos)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a request counts as failed")
    parser.add_argument("--label", default="native", help="backend name recorded in the results (native, vllm)")
    parser.add_argument("--machine", help="machine description to record (default: detected GPU/CPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/serve-<label>-<date>.json)")
    parser.add_argument("--note", help="free text stored in the record (e.g. which server build, the machine's load)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(main_async(args))
    out = args.out or RESULTS / f"serve-{args.label}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")
    save_figure_beside("serve", report, out)
    return 0 if all(level["failed"] == 0 for level in report["levels"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
