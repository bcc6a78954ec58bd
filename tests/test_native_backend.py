"""The native backend's streams: deltas that pile up while a stream is not read are handed out as one."""

from __future__ import annotations

import asyncio
import sys

import pytest

from engine.backend import CompletionDelta, TokenLogprob, merge_deltas
from engine.backends.native import GIL_SWITCH_INTERVAL_S, NativeBackend
from engine.sampling_params import SamplingParams
from tests.test_server_support import tiny_model_dir


def test_merge_deltas_joins_text_tokens_and_logprobs_and_keeps_the_end():
    first = CompletionDelta(
        "r", 0, "he", [5], [TokenLogprob(5, "he", -0.5)], num_prompt_tokens=3, num_generated_tokens=1
    )
    later = CompletionDelta(
        "r", 0, "llo", [7, 8], [TokenLogprob(7, "l", -1.0), TokenLogprob(8, "lo", -2.0)], True, "stop", "o", 0, 3
    )
    merged = merge_deltas(first, later)
    assert (merged.text, merged.token_ids) == ("hello", [5, 7, 8])
    assert [entry.logprob for entry in merged.logprobs] == [-0.5, -1.0, -2.0]
    assert (merged.finished, merged.finish_reason, merged.stop_reason) == (True, "stop", "o")
    assert (merged.num_prompt_tokens, merged.num_generated_tokens) == (3, 3)
    no_logprobs = merge_deltas(CompletionDelta("r", 0, "a", [1]), CompletionDelta("r", 0, "b", [2]))
    assert no_logprobs.logprobs is None


def test_a_stream_read_late_gets_its_backlog_as_one_delta_with_every_token():
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def run() -> tuple[list[CompletionDelta], list[CompletionDelta]]:
        backend = NativeBackend(str(tiny_model_dir()), device="cpu", max_model_len=128, max_num_seqs=2)
        await backend.start()
        try:
            read_at_once = [delta async for delta in backend.generate("hello there", params, "prompt-read")]
            late = backend.generate("hello there", params, "late-read")
            first = await anext(late)  # the request is running; now let the engine finish it unread
            while backend.core.has_work():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the last step's deltas reach the stream's queue
            return read_at_once, [first] + [delta async for delta in late]
        finally:
            await backend.shutdown(drain_timeout=1)

    read_at_once, late = asyncio.run(run())
    tokens = [t for d in read_at_once for t in d.token_ids]
    assert len(tokens) == 12
    assert len(late) == 2  # the first delta, then everything generated meanwhile in one
    assert [t for d in late for t in d.token_ids] == tokens
    assert "".join(d.text for d in late) == "".join(d.text for d in read_at_once)
    assert late[-1].finished and late[-1].finish_reason == "length" and late[-1].num_generated_tokens == 12


def test_the_gil_switch_interval_is_short_while_serving_and_restored_after():
    before = sys.getswitchinterval()

    async def run() -> float:
        backend = NativeBackend(str(tiny_model_dir()), device="cpu", max_model_len=64, max_num_seqs=1)
        await backend.start()
        try:
            return sys.getswitchinterval()
        finally:
            await backend.shutdown(drain_timeout=1)

    assert asyncio.run(run()) == pytest.approx(GIL_SWITCH_INTERVAL_S)
    assert GIL_SWITCH_INTERVAL_S < before
    assert sys.getswitchinterval() == pytest.approx(before)


def test_embeddings_run_in_chunks_between_decode_steps_and_equal_one_forward_pass():
    """A batch whose forward passes would take long is embedded a chunk at a time: the running stream keeps
    getting tokens while it is computed, and the vectors equal those of one pass over each whole input."""
    import torch

    prompts = [[(7 * i + j) % 6000 + 3 for j in range(300 + 40 * i)] for i in range(6)]  # 3-4 chunks each
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def run() -> tuple[list[list[float]], int, NativeBackend]:
        backend = NativeBackend(str(tiny_model_dir()), device="cpu", max_model_len=512, max_num_seqs=2)
        await backend.start()
        try:
            stream = backend.generate("hello there", params, "stream")
            await anext(stream)
            embedding = asyncio.ensure_future(backend.embed(prompts))
            during = 0
            async for delta in stream:
                if embedding.done():
                    break
                during += len(delta.token_ids)
            return await embedding, during, backend
        finally:
            await backend.shutdown(drain_timeout=0)

    vectors, tokens_during, backend = asyncio.run(run())
    assert tokens_during >= len(prompts)  # decode steps ran between the chunks, not after the whole batch
    with torch.inference_mode():
        for prompt, vector in zip(prompts, vectors):
            hidden = backend.core.model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0]
            want = torch.nn.functional.normalize(hidden.float().mean(0), dim=-1)
            assert torch.allclose(torch.tensor(vector), want, atol=1e-5)
