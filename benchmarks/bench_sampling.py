"""Sampler overhead per decode step: eager vs captured in a CUDA graph, for a few batch and vocabulary sizes.

Prints a table and saves JSON under benchmarks/results/ with the device named. Not a test: timings vary.

    python benchmarks/bench_sampling.py [--device cuda] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.provenance import provenance
from engine.sampling import SamplingTensors, sample
from engine.sampling_params import SamplingParams


def time_steps(fn, steps: int, sync) -> float:
    for _ in range(5):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps * 1e6  # microseconds per step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    rows = []
    for vocab in (6400, 49152):
        for batch in (1, 64, 256):
            for mode in ("greedy", "sampled"):
                params = [
                    SamplingParams(temperature=0)
                    if mode == "greedy"
                    else SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i)
                    for i in range(batch)
                ]
                t = SamplingTensors.from_params(params, vocab, device)
                logits = torch.randn(batch, vocab, device=device)
                lens = torch.zeros(batch, dtype=torch.int64, device=device)
                eager = time_steps(lambda t=t, x=logits, n=lens: sample(x, t, n), args.steps, sync)
                graphed = None
                if cuda:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        sample(logits, t, lens)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        sample(logits, t, lens)
                    graphed = time_steps(graph.replay, args.steps, sync)
                rows.append(dict(vocab=vocab, batch=batch, mode=mode, eager_us=eager, graph_us=graphed))
                graph_text = f"{graphed:9.1f}" if graphed is not None else "        -"
                print(f"V={vocab:6d} B={batch:4d} {mode:8s} eager {eager:9.1f} us  graph {graph_text} us")
    out = Path(__file__).parent / "results" / f"sampling-{'gpu' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **provenance(__file__),
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
