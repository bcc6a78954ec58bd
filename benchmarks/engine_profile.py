"""What bounds one decode step of the native engine on a GPU: kernels per step, GPU time per step, host time per step.

Used by bench_engine.py (`--profile`). Three numbers per model at batch 1:
- kernels per step: CUDA kernels one decode forward launches, eager and through torch.compile (torch.profiler);
- GPU time per step: a captured step graph replayed back to back, timed with CUDA events (no host work in between);
- engine time per step: wall time of `LLM.generate` per token; the difference to the GPU time is host work
  (scheduling, sampling launches, the device-to-host copy of the token, detokenizing) that the GPU waits on.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile


def count_kernels(fn, *args) -> int:
    """CUDA kernels (and memcpy/memset work) one call of fn launches."""
    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def top_kernels(fn, *args, limit: int = 10) -> list[list]:
    """[name, launches, total microseconds] of the kernels one call of fn spends the most device time in."""
    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.count and total:
            rows.append([e.key[:90], e.count, round(total, 1)])
    return sorted(rows, key=lambda r: -r[2])[:limit]


def replay_us(graph: torch.cuda.CUDAGraph, repeats: int = 200) -> float:
    """Mean GPU microseconds of one replay, replays issued back to back."""
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


@torch.inference_mode()
def profile_decode(llm, new_tokens: int, tok_s: float) -> dict:
    """Profile batch-1 decode of an idle engine (no request may be running: the step writes into slots 0..1)."""
    runner = llm.engine.runner
    assert not llm.engine.has_work()
    batch = runner.batch_buckets[0]
    result: dict = {"batch_bucket": batch, "compiled": runner.compiled is not None}
    tokens = runner.tokens_buf[:batch, :1]
    start = runner.start_buf[:batch]
    result["kernels_per_step_eager"] = count_kernels(runner._graph_forward, tokens, start, runner.key_pos[:64])
    if runner.compiled is not None:
        fn, args = runner._step_fn(batch, 1, 64)
        result["kernels_per_step_compiled"] = count_kernels(fn, *args)
        result["top_kernels_compiled"] = top_kernels(fn, *args)
    else:
        result["top_kernels_eager"] = top_kernels(runner._graph_forward, tokens, start, runner.key_pos[:64])
    graphs = {key: g for key, g in runner.graphs.items() if key[0] == batch and key[1] == 1}
    if graphs:
        key = max(graphs, key=lambda k: k[2])
        result["graph_key"] = list(key)
        result["gpu_us_per_step"] = round(replay_us(graphs[key][0]), 1)
    result["engine_us_per_step"] = round(1e6 / tok_s, 1)
    if "gpu_us_per_step" in result:
        result["host_us_per_step"] = round(result["engine_us_per_step"] - result["gpu_us_per_step"], 1)
    return result


def timed(fn, *args, **kwargs):
    """(seconds, result) of fn(*args, **kwargs), synchronising the GPU before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out
