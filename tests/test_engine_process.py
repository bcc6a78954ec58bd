"""The engine-process channel's messages (engine/backends/wire.py) and the start-up warm-up (engine/warmup.py)."""

from __future__ import annotations

import pytest
import torch

from engine.backend import CompletionDelta, EngineStats, TokenLogprob
from engine.backends import wire
from engine.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutputsParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pixel_tensors_cross_the_channel_bit_for_bit(dtype):
    pixels = torch.randn(2, 3, 32, 32).to(dtype)
    message = wire.AddRequest("r", [1, 2], SamplingParams(), None, wire.Tensor.of(pixels))
    back = wire.to_engine.decode(wire.encoder.encode(message)).images.to_torch()
    assert back.dtype == dtype and back.shape == pixels.shape and torch.equal(back, pixels)


def test_sampling_params_and_grammar_arrive_whole_and_are_validated_again():
    params = SamplingParams(temperature=0.5, top_k=5, stop=["x"], logprobs=3, seed=7)
    params.structured_outputs = StructuredOutputsParams(json={"type": "object"})
    back = wire.to_engine.decode(wire.encoder.encode(wire.AddRequest("r", [1], params)))
    assert back.params == params
    broken = wire.encoder.encode(wire.AddRequest("r", [1], SamplingParams())).replace(b"\xa1n\x01", b"\xa1n\x00")
    with pytest.raises(InvalidRequestError, match="n must be at least 1"):
        wire.to_engine.decode(broken)


def test_one_outputs_message_carries_many_streams_with_logprobs_and_errors():
    top = [(5, "a", -0.5), (6, "b", -1.5)]
    deltas = [
        CompletionDelta(f"r{i}", 0, "hi", [5], [TokenLogprob(5, "a", -0.5, top)], num_generated_tokens=1)
        for i in range(64)
    ]
    deltas[3].finished, deltas[3].finish_reason, deltas[3].stop_reason = True, "stop", "x"
    out = wire.Outputs(
        deltas=deltas,
        acks=[wire.Ack("a"), wire.Ack("b", wire.ErrorInfo.of(QueueFullError("full")))],
        failed=[wire.Failed("c", wire.ErrorInfo("EngineError", "boom"))],
        stats=EngineStats(3, 1, 0.25, 60),
    )
    back = wire.outputs.decode(wire.encoder.encode(out))
    assert back.deltas == deltas and back.stats == EngineStats(3, 1, 0.25, 60)
    assert back.acks[0].error is None
    refused = back.acks[1].error.to_exception()
    assert type(refused) is QueueFullError and str(refused) == "full"


def test_errors_keep_their_type_and_field_across_the_channel():
    err = wire.ErrorInfo.of(PromptTooLongError("too long", param="max_tokens")).to_exception()
    assert type(err) is PromptTooLongError and err.param == "max_tokens"
    unknown = wire.ErrorInfo.of(RuntimeError("CUDA error")).to_exception()
    assert type(unknown).__name__ == "EngineError" and "CUDA error" in str(unknown)


def test_warm_up_runs_every_sampling_path_and_leaves_the_engine_empty():
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.warmup import SAMPLING_PATHS, warm_up
    from tests.test_server_support import tiny_model_dir

    core = build_engine(EngineConfig(model=str(tiny_model_dir()), device="cpu", max_model_len=64, max_num_seqs=4))
    seen: list[str] = []
    step = core.step

    def counting_step():
        deltas = step()
        seen.extend(d.request_id for d in deltas if d.finished)
        return deltas

    core.step = counting_step
    warm_up(core)
    finished = {rid for rid in seen}
    prefills = {"warm-up-prefill-16"}  # 64 tokens do not fit a 64-token context with their answer
    assert finished == {f"warm-up-{i}" for i in range(len(SAMPLING_PATHS))} | prefills
    assert not core.has_work() and core.cache.num_free == core.cache.num_slots


def test_warm_up_fits_a_one_place_queue_and_skips_what_it_can_never_queue():
    """--max-queue 1: the paths run one after another, and n=2 (which no client could send either) is skipped."""
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.warmup import SAMPLING_PATHS, warm_sampling_paths
    from tests.test_server_support import tiny_model_dir

    config = EngineConfig(model=str(tiny_model_dir()), device="cpu", max_model_len=64, max_num_seqs=1, max_queue=1)
    core = build_engine(config)
    assert warm_sampling_paths(core) == len(SAMPLING_PATHS) - 1
    assert not core.has_work() and core.cache.num_free == core.cache.num_slots


class FailOnce:
    """Wraps the engine's step(): once armed, the first call with a request running and another waiting raises (as
    a CUDA error would); later ones run normally. Waiting for that state, not for a time, keeps the test exact."""

    def __init__(self, core) -> None:
        self.core, self.step, self.armed = core, core.step, False

    def __call__(self):
        scheduler = self.core.scheduler
        if self.armed and scheduler.running and scheduler.waiting:
            self.armed = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return self.step()


def test_engine_loop_and_remote_backend_over_a_real_socket(tmp_path):
    """The engine loop in a thread, a RemoteBackend talking to it: streams, 429, a failed step, abort, embeddings."""
    import asyncio
    import threading

    from engine.backends.engine_process import EngineLoop, engine_info
    from engine.backends.remote import RemoteBackend
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.errors import EngineError
    from tests.test_server_support import tiny_model_dir

    config = EngineConfig(model=str(tiny_model_dir()), device="cpu", max_model_len=128, max_num_seqs=1, max_queue=2)
    core = build_engine(config)
    failing = core.step = FailOnce(core)
    address = f"ipc://{tmp_path}/engine.sock"
    loop = EngineLoop(core, address, engine_info(core, config, "tiny"))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    backend = RemoteBackend(address)
    assert backend.info.name == "tiny" and backend.tokenizer.decode(backend.tokenizer("hi")["input_ids"]) == "hi"

    async def collect(request_id: str, max_tokens: int) -> list:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [d async for d in backend.generate([1, 2, 3], params, request_id)]

    async def scenario() -> None:
        await backend.start()
        deltas = await collect("a", 6)
        assert sum(len(d.token_ids) for d in deltas) == 6 and deltas[-1].finish_reason == "length"
        assert {d.request_id for d in deltas} == {"a"}
        # one running, one waiting (429s across the channel: tests/test_server_errors.py, every layout)
        failing.armed = True  # the first step with both in the engine fails: both end with the error
        running = asyncio.create_task(collect("b", 100))
        waiting = asyncio.create_task(collect("c", 100))
        for task in (running, waiting):
            with pytest.raises(EngineError, match="illegal memory access"):
                await task
        # the engine lives on; leaving a stream early aborts it and frees the slot
        stream = backend.generate([1, 2], SamplingParams(max_tokens=100, ignore_eos=True), "e")
        await anext(stream)
        await stream.aclose()
        for _ in range(50):
            await backend.refresh_stats()
            if backend.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        assert backend.stats().running == 0 and backend.stats().free_slots == 1
        vectors = await backend.embed([[1, 2, 3], [4, 5]])
        assert len(vectors) == 2 and abs(sum(v * v for v in vectors[0]) - 1) < 1e-4
        await backend.shutdown(drain_timeout=1)

    try:
        asyncio.run(scenario())
    finally:
        loop.stopped = True
        thread.join(10)
