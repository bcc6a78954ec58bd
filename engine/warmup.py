"""`warm_up(core)`: run every shape a request can hit once at start-up, so no client pays for a first time.

A first time costs: a CUDA graph capture (and, with --compile, the compilation) per decode shape, which the
runner does lazily per (batch bucket, tokens per row, history-length bucket); the first call of each sampling
path's kernels (top-p/top-k sorting, penalties, logprobs, seeded sampling, the structured-outputs mask and its
tokenizer table); a prefill of a new length. A server that skipped this answered its first request on an H200
in 1.37 s instead of a few milliseconds.

Three parts:
- every decode shape the runner buckets, driven straight through `runner.step` with dummy tokens on free slots
  (nothing is running yet, so the cache rows they write are free rows);
- every sampling path, as a few short real requests through `add_request`/`step` (they also warm prefill and
  the output path), so the warm-up follows whatever the scheduler does with requests;
- a ladder of prompt lengths, one greedy token each (prefill is not captured, but a new size is a first time too).
On the CPU without --compile nothing is bucketed, so the first part has nothing to do and the rest takes a few
hundred milliseconds; with --compile every shape compiles here (minutes, not the first client's).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from engine.errors import EngineError, QueueFullError
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutputsParams

log = logging.getLogger("minimind.engine")


def freeze_heap(where: str) -> None:
    """Put every object alive after the warm-up out of the garbage collector's reach (`gc.freeze`, as vLLM does
    after its own warm-up). A compiled model leaves hundreds of thousands of long-lived Python objects (FX graphs,
    guards, generated kernels): on the 2-core CPU here a full collection walked 210k of them in about 100 ms (tiny
    model, --compile), a pause that lands on whichever request is being served whenever the collector's
    thresholds trip. Frozen objects are neither scanned nor freed; they live as long as the process anyway."""
    gc.collect()
    gc.freeze()
    log.debug("froze %d objects in the %s", gc.get_freeze_count(), where)


# One request per sampling path the sampler has (engine/sampler.py, engine/sampling.py).
SAMPLING_PATHS: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 0.8},
    {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "min_p": 0.05},
    {"temperature": 0.8, "seed": 1},
    {"temperature": 0.8, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"temperature": 0.0, "logprobs": 5, "prompt_logprobs": 1},
    {"temperature": 0.8, "logprobs": 0, "logprobs_mode": "processed"},
    {"temperature": 0.0, "min_tokens": 2},
    {"temperature": 0.8, "n": 2},
    {"temperature": 0.0, "structured_outputs": StructuredOutputsParams(json_object=True)},
]


def warm_up(core: Any) -> float:
    """Capture every decode shape and run every sampling path once; returns the seconds it took."""
    started = time.perf_counter()
    shapes = warm_decode_shapes(core)
    paths = warm_sampling_paths(core)
    lengths = warm_prefill_lengths(core)
    seconds = time.perf_counter() - started
    log.info(
        "warm-up: %d decode shapes, %d sampling paths and %d prompt lengths in %.1fs", shapes, paths, lengths, seconds
    )
    return seconds


def warm_decode_shapes(core: Any) -> int:
    """Every (batch bucket, tokens per row, history bucket) the runners replay, target and draft. Returns how many."""
    runners = [(core.runner, [1])]
    if core.spec is not None:
        k = core.spec.k
        runners = [(core.runner, [1, k + 1]), (core.spec.draft, [1, 2])]
    count = 0
    for runner, widths in runners:
        if not (getattr(runner, "use_graphs", False) or getattr(runner, "compiled", None) is not None):
            continue  # eager steps (the CPU): nothing is captured or compiled per shape
        for batch in runner.batch_buckets:
            for width in widths:
                for kv_len in runner.len_buckets:
                    if kv_len < width:
                        continue
                    with core.lock:
                        runner.step(list(range(batch)), [[0] * width] * batch, [kv_len - width] * batch)
                    count += 1
    return count


def warm_sampling_paths(core: Any) -> int:
    """A short request per sampling path, batched together as far as the queue allows (the batched sampler then
    sees the paths side by side too). A path the server's limits refuse (n=2 with --max-queue 1, say) is refused
    to clients as well, so it is skipped. Returns how many paths ran."""
    _, prompt = core.encode("warm-up")
    ran = 0
    for i, fields in enumerate(SAMPLING_PATHS):
        try:
            params = SamplingParams(max_tokens=3, ignore_eos=True, **fields)
        except ImportError as err:  # an optional path's library is missing (llguidance): clients get the same error
            log.warning("warm-up skips %s: %s", sorted(fields), err)
            continue
        for attempt in range(2):
            try:
                core.add_request(f"warm-up-{i}", list(prompt), params)
                ran += 1
                break
            except QueueFullError:
                if attempt == 0:
                    run_until_idle(core)  # the queue is full of earlier paths: let them finish, then retry
            except EngineError:
                break
    run_until_idle(core)
    return ran


def warm_prefill_lengths(core: Any) -> int:
    """One greedy one-token request per prompt length of a ladder (up to 4,096 tokens on a GPU, 64 on the CPU):
    prefill is not captured, but the first prompt of a new size still pays for the kernels and GEMM plans it is the
    first to use. Returns how many lengths ran."""
    gpu = core.runner.device.type == "cuda"
    vocab = core.model.config.vocab_size
    ran = 0
    for length in (16, 64, 256, 1024, 4096) if gpu else (16, 64):
        if length + 1 >= core.config.max_model_len:
            break
        prompt = [(7 * i + 3) % vocab for i in range(length)]
        try:
            core.add_request(f"warm-up-prefill-{length}", prompt, SamplingParams(max_tokens=1, temperature=0))
        except EngineError:
            break
        run_until_idle(core)
        ran += 1
    return ran


def run_until_idle(core: Any) -> None:
    while core.has_work():
        core.step()
