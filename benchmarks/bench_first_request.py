"""Time to first token of the first requests after `minimind serve` turns healthy, against its steady state.

    python benchmarks/bench_first_request.py --model tests-tiny --layouts "" "--api-server-count 4"
    python benchmarks/bench_first_request.py --model DIR --server-args=--compile \\
        --layouts "--api-server-count 1" "--api-server-count 4" --out benchmarks/results/first-request-h200.json

For each layout (extra `minimind serve` flags): start the server, poll /health every 50 ms, and at its first 200
make one untimed async GET /health (the client's own first-time cost, see bench_serve.py `warm_client`), then send
`--requests` streamed completions one after another, each on a new connection (so that with several API processes
the kernel spreads them over all of them, and each process's first request is among them). Reported per layout:
every request's TTFT in send order, the first one, the slowest of the first `--first` (one per API process, by
default 4), and the median of the rest (the steady state). `--model tests-tiny` builds the test suite's tiny random
model, so the script runs on any machine. JSON only; the figures a user would quote are the first-request and
steady-state TTFTs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_serve  # noqa: E402
from benchmarks.bench_vllm_serve import Server  # noqa: E402
from benchmarks.provenance import machine_name, provenance  # noqa: E402

SERVED_NAME = "m"


def measure_layout(model: str, layout: str, args: argparse.Namespace, folder: Path, index: int) -> dict:
    base_url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "minimind", "serve", "--model", model, "--host", "127.0.0.1"]
    cmd += ["--port", str(args.port), "--served-model-name", SERVED_NAME, "--log-level", "warning"]
    cmd += shlex.split(args.server_args) + shlex.split(layout)
    server = Server(cmd, folder / f"layout-{index}.log", base_url)
    try:
        healthy_s = server.wait_healthy(args.start_timeout, poll_s=0.05)  # the first request goes right after
        bench_serve.warm_client(base_url)
        ttfts = [
            bench_serve.first_token_ms(base_url, SERVED_NAME, args.prompt, args.max_tokens)
            for _ in range(args.requests)
        ]
    finally:
        server.stop()
    steady = statistics.median(ttfts[args.first :])
    row = {
        "layout": layout,
        "command": shlex.join(cmd),
        "healthy_after_s": round(healthy_s, 1),
        "ttft_per_request_ms": [round(t, 2) for t in ttfts],
        "first_ms": round(ttfts[0], 2),
        "slowest_of_first_ms": round(max(ttfts[: args.first]), 2),
        "steady_median_ms": round(steady, 2),
        "steady_max_ms": round(max(ttfts[args.first :]), 2),
    }
    print(
        f"{layout or '(defaults)'}: healthy after {healthy_s:.1f} s; first request {row['first_ms']} ms, slowest of "
        f"the first {args.first} {row['slowest_of_first_ms']} ms, then median {row['steady_median_ms']} ms "
        f"(max {row['steady_max_ms']} ms)",
        flush=True,
    )
    return row


def tiny_model() -> str:
    """The test suite's tiny random model (tests/test_server_support.py), built here."""
    from tests.test_server_support import tiny_model_dir

    return str(tiny_model_dir())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tests-tiny", help="model for `minimind serve` (tests-tiny: built here)")
    parser.add_argument("--layouts", nargs="+", default=["", "--api-server-count 4"], help="extra flags per layout")
    parser.add_argument(
        "--server-args",
        default="",
        help="flags for every layout, e.g. --server-args=--compile (with '=': a lone flag is read as an option)",
    )
    parser.add_argument("--requests", type=int, default=24, help="sequential requests after the first 200")
    parser.add_argument("--first", type=int, default=4, help="how many count as first requests (one per process)")
    parser.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog because")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--port", type=int, default=8210)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--note", help="what else a reader should know about the run (recorded)")
    parser.add_argument("--out", type=Path, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    if not 0 < args.first < args.requests:
        parser.error("--first must be at least 1 and below --requests")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="minimind-first-request-"))
    model = tiny_model() if args.model == "tests-tiny" else args.model
    rows = [measure_layout(model, layout, args, folder, i) for i, layout in enumerate(args.layouts)]
    report = {
        "benchmark": "first-request",
        **provenance(__file__),
        "machine": machine_name(),
        "model": args.model,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "layouts": rows,
    }
    if args.note:
        report["note"] = args.note
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
