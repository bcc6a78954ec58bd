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
    assert finished == {f"warm-up-{i}" for i in range(len(SAMPLING_PATHS))}
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
