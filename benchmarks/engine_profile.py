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


@torch.inference_mode()
def profile_hf_generate(model, prompt: torch.Tensor, new_tokens: int = 32) -> dict:
    """Per decode step of HF `generate` (greedy, batch 1): CUDA kernels, host-device synchronisations, allocator
    calls (cudaMalloc/cudaFree) and the host operators that take the most time: what makes one model class slower
    than another under the same `generate`."""

    def run() -> None:
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        torch.cuda.synchronize()

    run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    steps = new_tokens
    events = prof.events()
    runtime = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMalloc", "cudaFree"}
    counts = {name: 0 for name in runtime}
    kernels = 0
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
        elif e.name in counts:
            counts[e.name] += 1
    host_ops = sorted(
        (e for e in prof.key_averages() if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total
    )[:8]
    return {
        "steps": steps,
        "kernels_per_step": round(kernels / steps, 1),
        "syncs_per_step": round(
            sum(counts[n] for n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")) / steps,
            2,
        ),
        "cuda_malloc_free_per_step": round((counts["cudaMalloc"] + counts["cudaFree"]) / steps, 2),
        "top_host_ops": [[e.key, e.count, round(e.self_cpu_time_total / steps, 1)] for e in host_ops],
    }


def timed(fn, *args, **kwargs):
    """(seconds, result) of fn(*args, **kwargs), synchronising the GPU before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out
