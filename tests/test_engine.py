"""The native engine end to end on tiny random models (CPU): greedy output equal to HF transformers' greedy
`generate` on the same weights (dense and MoE, alone and batched, with requests queueing and joining mid-run),
seeded sampling independent of batch neighbours, n > 1, cancellation, over-long prompts, LoRA merged at load,
and speculative decoding with a draft model (engine and `minimind generate` flags)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from engine.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from minimind.cli import main
from tests.conftest import tiny_model

MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64)
# initializer_range 0.2 (not 0.02): logits far apart, so greedy never hinges on a near-tie and tokens vary
WIDE = dict(initializer_range=0.2)
PROMPT_LENS = (5, 23, 9, 31, 14)
NEW = 12


def greedy(max_tokens: int = NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def prompts(lengths=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 6400, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], new_tokens: int = NEW) -> list[int]:
    """transformers' own greedy decoding (DynamicCache, its masks), EOS off so the length is fixed."""
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    out = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
    assert len(out) == new_tokens
    return out


@pytest.fixture(scope="module")
def tokenizer(upstream_fixtures):
    return AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense"))


@pytest.fixture(scope="module", params=["dense", "moe"])
def case(request):
    """(model, HF greedy reference for each of prompts()) per architecture, computed once."""
    model = tiny_model(seed=1, **WIDE, **(MOE if request.param == "moe" else {}))
    return model, [hf_greedy(model, p) for p in prompts()]


def make_llm(model, tokenizer, **kw) -> LLM:
    return LLM(model, tokenizer=tokenizer, device="cpu", max_model_len=kw.pop("max_model_len", 128), **kw)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- greedy identity with HF transformers ----------------------------------------------------------------------------


def test_single_prompt_matches_hf(case, tokenizer):
    model, expected = case
    llm = make_llm(model, tokenizer, max_num_seqs=1)
    for prompt, ref in zip(prompts(), expected):
        assert token_ids(llm.generate([prompt], greedy())) == [ref]


def test_batch_of_different_lengths_matches_hf_and_a_queue_forms(case, tokenizer):
    """Five prompts of different lengths and output lengths through two cache slots: three wait, and each joins
    the running batch when another finishes; every output equals its request run alone through HF."""
    model, expected = case
    llm = make_llm(model, tokenizer, max_num_seqs=2)
    assert llm.engine.cache.num_slots == 2
    lengths = [NEW, 4, NEW, 7, 10]  # different max_tokens: requests leave at different steps
    outs = llm.generate(prompts(), [greedy(n) for n in lengths])
    assert token_ids(outs) == [ref[:n] for ref, n in zip(expected, lengths)]
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 5
    assert llm.engine.cache.num_free == 2 and not llm.engine.has_work()


def test_requests_joining_mid_run_match_hf(case, tokenizer):
    """Drive the engine step by step: a request added while others are decoding is prefilled between decode steps
    and decodes alongside them; nothing any request produces depends on who else is in the batch."""
    model, expected = case
    core = make_llm(model, tokenizer, max_num_seqs=3).engine
    ps = prompts()
    got: dict[str, list[int]] = {}

    def step() -> None:
        for delta in core.step():
            got.setdefault(delta.request_id, []).extend(delta.token_ids)

    core.add_request("r0", ps[0], greedy())
    core.add_request("r1", ps[1], greedy())
    while len(got.get("r0", [])) < 4:
        step()
    assert len(core.scheduler.running) == 2 and len(got["r1"]) == 4
    core.add_request("r2", ps[2], greedy())  # joins mid-run
    core.add_request("r3", ps[3], greedy())  # waits: three slots
    step()  # prefill of r2 only
    assert [s.request_id for s in core.scheduler.running] == ["r0", "r1", "r2"]
    assert len(core.scheduler.waiting) == 1 and core.cache.num_free == 0
    while core.has_work():
        step()
    assert [got[f"r{i}"] for i in range(4)] == expected[:4]
    assert core.cache.num_free == 3


def test_rows_follow_slots_not_batch_order(tokenizer):
    """After early finishers free low slots, new requests take them and the decode batch has holes: outputs still
    match requests run alone (the cache is gathered by slot)."""
    model = tiny_model(seed=2, **WIDE)
    ps = prompts(seed=5)
    alone = token_ids(make_llm(model, tokenizer, max_num_seqs=1).generate(ps, greedy()))
    lengths = [2, NEW, 3, NEW, NEW]
    mixed = token_ids(make_llm(model, tokenizer, max_num_seqs=3).generate(ps, [greedy(n) for n in lengths]))
    assert mixed == [ref[:n] for ref, n in zip(alone, lengths)]


def test_engine_forward_passes_leave_cudnn_attention_out(tokenizer):
    """cuDNN's attention builds a plan per new shape: on an H200 each prompt length the server had not seen yet cost
    50-80 ms of prefill (engine/model_runner.py). Every pass the engine runs, prefill and decode, sees it switched
    off, and the process default is back afterwards (training keeps whatever SDPA picks)."""
    model = tiny_model(seed=3)
    seen: list[bool] = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    assert torch.backends.cuda.cudnn_sdp_enabled()
    make_llm(model, tokenizer, max_num_seqs=2).generate(prompts()[:2], greedy(4))
    assert len(seen) >= 4 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_engine_counts_its_steps_by_kind(tokenizer):
    """EngineStats (and /metrics) count prefill and decode steps: prompts given together share one prefill step,
    prompts that arrive while others decode each cost one of their own."""
    llm = make_llm(tiny_model(seed=3), tokenizer, max_num_seqs=4)
    llm.generate(prompts()[:3], greedy(5))  # one prefill step gives each its first token, four decode steps the rest
    stats = llm.engine.stats()
    assert (stats.prefill_steps, stats.decode_steps) == (1, 4)
    engine = llm.engine
    for i, prompt in enumerate(prompts(seed=4)[:3]):  # one new request after each step
        engine.add_request(f"late-{i}", prompt, greedy(5))
        engine.step()
    while engine.has_work():
        engine.step()
    stats = engine.stats()
    assert stats.prefill_steps == 1 + 3 and stats.decode_steps > 4


def test_stop_token_mid_batch_ends_only_that_request(case, tokenizer):
    """Steps are pipelined, so the engine learns of a stop one step late: the token computed past it is dropped,
    the neighbour is unaffected, and the slot is free when generate returns."""
    model, expected = case
    llm = make_llm(model, tokenizer, max_num_seqs=2)
    stop_at = next(i for i in range(2, NEW) if expected[0][i] not in expected[0][:i])  # first occurrence
    outs = llm.generate(prompts()[:2], [greedy(stop_token_ids=[expected[0][stop_at]]), greedy()])
    first = outs[0].outputs[0]
    assert first.token_ids == expected[0][: stop_at + 1]  # the stop token is kept in token_ids, as in vLLM
    assert (first.finish_reason, first.stop_reason) == ("stop", expected[0][stop_at])
    assert outs[1].outputs[0].token_ids == expected[1]
    assert llm.engine.cache.num_free == 2 and not llm.engine.has_work()


def test_penalised_neighbour_switches_to_unpipelined_steps(case, tokenizer):
    """A request with a repetition penalty needs its previous tokens on the host before each step; greedy
    requests around it still produce HF's output."""
    model, expected = case
    llm = make_llm(model, tokenizer, max_num_seqs=3)
    penalised = SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts()[:3], [greedy(), penalised, greedy()])
    assert token_ids(outs)[0] == expected[0] and token_ids(outs)[2] == expected[2]
    assert len(outs[1].outputs[0].token_ids) == 6


# ---- sampling -----------------------------------------------------------------------------------------------------


def test_seeded_sampling_reproducible_and_independent_of_neighbours(tokenizer):
    model = tiny_model(seed=1, **WIDE)
    ps = prompts()
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_tokens=NEW, ignore_eos=True)
    alone = token_ids(make_llm(model, tokenizer, max_num_seqs=1).generate([ps[0]], params))[0]
    llm = make_llm(model, tokenizer, max_num_seqs=2)
    neighbours = [params, greedy(), SamplingParams(temperature=0.7, seed=9, max_tokens=5), SamplingParams(max_tokens=8)]
    batched = token_ids(llm.generate([ps[0], ps[1], ps[2], ps[3]], neighbours))
    assert batched[0] == alone
    assert token_ids(llm.generate([ps[3], ps[0]], [greedy(), params]))[1] == alone  # another row, another slot
    other_seed = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=99, max_tokens=NEW, ignore_eos=True)
    assert token_ids(llm.generate([ps[0]], other_seed))[0] != alone  # the seed matters


def test_n_completions(tokenizer):
    """n=3 seeded: three different completions, reproducible, the first equal to n=1 with the same seed; greedy n=2
    gives two copies of the greedy output (the prompt's cache is copied to the other slot)."""
    model = tiny_model(seed=1, **WIDE)
    llm = make_llm(model, tokenizer, max_num_seqs=4)
    prompt = prompts()[1]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=NEW, ignore_eos=True)
    first = llm.generate([prompt], params)[0].outputs
    again = llm.generate([prompt], params)[0].outputs
    assert [c.index for c in first] == [0, 1, 2]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) == 3
    single = SamplingParams(n=1, temperature=1.0, seed=7, max_tokens=NEW, ignore_eos=True)
    assert token_ids(llm.generate([prompt], single))[0] == first[0].token_ids
    pair = llm.generate([prompt], greedy(n=2))[0].outputs
    assert pair[0].token_ids == pair[1].token_ids == hf_greedy(model, prompt)


# ---- cache and admission ------------------------------------------------------------------------------------------


def test_abort_frees_the_slot_at_once(tokenizer):
    llm = make_llm(tiny_model(seed=1, **WIDE), tokenizer, max_num_seqs=2)
    core = llm.engine
    ps = prompts()
    core.add_request("a", ps[0], greedy(50))
    core.add_request("b", ps[1], greedy(50))
    core.add_request("c", ps[2], greedy(50))  # waits
    core.step()
    core.step()
    assert core.cache.num_free == 0 and len(core.scheduler.waiting) == 1
    deltas = core.abort("a")
    assert [(d.finished, d.finish_reason) for d in deltas] == [(True, "abort")]
    assert core.cache.num_free == 1 and [s.request_id for s in core.scheduler.running] == ["b"]
    assert core.abort("c")[0].finish_reason == "abort" and not core.scheduler.waiting  # a waiting one leaves too
    assert core.abort("a") == []  # nothing live any more
    core.abort("b")
    assert core.cache.num_free == 2 and not core.has_work()


def test_a_sequence_equals_only_itself(tokenizer):
    """The scheduler takes a finished sequence out of `running` with list.remove. Field-by-field equality (a plain
    dataclass) compared prompt and output lists against every sequence before it there: about 17 ms of one step
    when 64 of 256 streams ended together."""
    llm = make_llm(tiny_model(seed=1, **WIDE), tokenizer, max_num_seqs=2)
    llm.engine.add_request("a", prompts()[0], greedy(50))
    llm.engine.step()
    seq = llm.engine.scheduler.running[0]
    twin = copy.copy(seq)  # every field equal
    assert twin != seq and len({seq, twin}) == 2
    running = [twin, seq]
    running.remove(seq)
    assert running[0] is twin and len(running) == 1


def test_leaving_a_stream_frees_the_slot(tokenizer):
    llm = make_llm(tiny_model(seed=1, **WIDE), tokenizer, max_num_seqs=2)
    stream = llm.stream(prompts()[0], greedy(50))
    first = next(stream)
    assert first.token_ids and llm.engine.cache.num_free == 1
    stream.close()
    assert llm.engine.cache.num_free == 2 and not llm.engine.has_work()


def test_prompt_longer_than_the_context_is_refused_before_any_work(tokenizer):
    llm = make_llm(tiny_model(seed=1, **WIDE), tokenizer, max_num_seqs=2, max_model_len=32)
    short, long = prompts((5, 32))
    with pytest.raises(PromptTooLongError, match="32 tokens.*max_model_len"):
        llm.generate([short, long], greedy(4))
    with pytest.raises(PromptTooLongError, match="max_tokens is 40"):
        llm.generate([short], greedy(40))  # prompt + max_tokens over the window
    assert llm.engine.cache.num_free == 2 and not llm.engine.has_work()
    assert token_ids(llm.generate([short], greedy(4)))[0] == hf_greedy(llm.model, short, 4)


def test_more_sequences_than_the_queue_holds_is_invalid_not_full(tokenizer):
    """n beyond max_queue could never wait in the queue: a bad request (400), not a busy server (429)."""
    llm = make_llm(tiny_model(seed=1, **WIDE), tokenizer, max_num_seqs=1, max_queue=2)
    core = llm.engine
    with pytest.raises(InvalidRequestError, match="3 sequences .* at most 2 can wait") as err:
        core.add_request("a", prompts()[0], greedy(4, n=3))
    assert err.value.param == "n" and not core.has_work()
    core.add_request("b", prompts()[0], greedy(4, n=2))
    with pytest.raises(QueueFullError):  # this one would fit once the queue empties
        core.add_request("c", prompts()[1], greedy(4))


# ---- LoRA ---------------------------------------------------------------------------------------------------------


def test_lora_merged_at_load_equals_the_merged_model(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    tiny_model(seed=1, **WIDE).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        tiny_model(seed=1, **WIDE), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()
    prompt = prompts()[2]
    expected = hf_greedy(merged, prompt)
    llm = LLM(str(tmp_path / "base"), device="cpu", max_model_len=64, lora=str(tmp_path / "adapter"))
    assert token_ids(llm.generate([prompt], greedy()))[0] == expected
    base = LLM(str(tmp_path / "base"), device="cpu", max_model_len=64)
    assert token_ids(base.generate([prompt], greedy()))[0] != expected  # the adapter changes the output


# ---- speculative decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft_kind", ["same", "other"])
def test_speculative_greedy_equals_the_target_alone(tokenizer, draft_kind):
    """A draft equal to the target (every proposal accepted) and an unrelated 1-layer draft (most rejected): the
    output is the target's greedy output either way, batched with different lengths and sampled neighbours (a
    seeded sampled row speculates too and is reproducible; a penalised one decodes plainly)."""
    target = tiny_model(seed=1, **WIDE)
    draft = tiny_model(seed=1, **WIDE) if draft_kind == "same" else tiny_model(seed=8, num_hidden_layers=1, **WIDE)
    ps = prompts()
    expected = [hf_greedy(target, p) for p in ps[:3]]
    spec = make_llm(target, tokenizer, max_num_seqs=3, draft_model=draft, num_speculative_tokens=3)
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=NEW, ignore_eos=True)
    penalised = SamplingParams(temperature=1.0, seed=3, max_tokens=NEW, ignore_eos=True, presence_penalty=0.5)
    outs = token_ids(spec.generate(ps, [greedy(), greedy(), greedy(), sampled, penalised]))
    assert outs[:3] == expected
    assert token_ids(spec.generate([ps[3]], sampled))[0] == outs[3]  # seeded: the same draws again
    plain = make_llm(target, tokenizer, max_num_seqs=1)
    assert outs[4] == token_ids(plain.generate([ps[4]], penalised))[0]  # penalised rows decode plainly, same seed
    rate = spec.engine.spec.acceptance_rate
    assert rate == 1.0 if draft_kind == "same" else rate < 0.5


def test_generate_cli_speculative_flags(tokenizer, tmp_path, capsys):
    for name, model in (("target", tiny_model(seed=1, **WIDE)), ("draft", tiny_model(seed=1, **WIDE))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    base = ["generate", "--model", str(tmp_path / "target"), "--prompt", "hello world", "--temperature", "0"]
    base += ["--max-tokens", "10", "--device", "cpu", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["completions"][0]
    spec_args = ["--draft-model", str(tmp_path / "draft"), "--num-speculative-tokens", "3"]
    assert main(base + spec_args) == 0
    spec = json.loads(capsys.readouterr().out)["completions"][0]
    assert spec["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 10
    assert main(base + ["--draft-model", str(tmp_path / "draft"), "--num-speculative-tokens", "0"]) != 0
    assert "num-speculative-tokens" in capsys.readouterr().err


def test_cli_model_flags_reach_the_engine():
    import argparse

    from engine.cli.args import add_model_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["--draft-model", "d", "--num-speculative-tokens", "6"]))
    assert (config.draft_model, config.num_speculative_tokens, config.compile_model) == ("d", 6, False)
    assert engine_config_from_args(parser.parse_args(["--compile"])).compile_model is True
    config = engine_config_from_args(
        parser.parse_args(
            ["--max-num-seqs", "3", "--max-prefill-tokens", "32", "--kv-cache-memory", "1MiB", "--no-cuda-graphs"]
        )
    )
    assert (config.max_num_seqs, config.max_prefill_tokens, config.kv_cache_memory) == (3, 32, 1 << 20)
    assert config.cuda_graphs is False
    with pytest.raises(InvalidRequestError, match="--max-prefill-tokens: max_prefill_tokens must be at least 1"):
        engine_config_from_args(parser.parse_args(["--max-prefill-tokens", "0"]))


def test_every_engine_field_reaches_the_engine_from_each_front_end(tokenizer, tmp_path):
    """LLM(...), serve's settings and the generate/chat flags name every EngineConfig field, and the built
    engine runs with what they set (max_prefill_tokens included)."""
    import argparse
    import dataclasses

    from engine.cli.args import add_model_arguments
    from engine.config import EngineConfig
    from server import settings as server_settings

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    cli = argparse.ArgumentParser()
    add_model_arguments(cli)
    # every engine field has a flag (--compile for compile_model); max_queue bounds waiting requests: serve only
    assert fields - {"compile_model", "max_queue"} <= set(vars(cli.parse_args([])))
    assert fields - {"compile_model"} <= set(server_settings.OPTIONS) | {"model", "tokenizer"}
    settings = server_settings.Settings(max_prefill_tokens=24, cuda_graphs=False)
    server_settings.validate(settings)
    from_serve = EngineConfig.from_fields(dataclasses.asdict(settings), compile_model=settings.compile)
    assert (from_serve.max_prefill_tokens, from_serve.cuda_graphs, from_serve.max_num_seqs) == (24, False, 64)

    llm = make_llm(tiny_model(seed=1, **WIDE), tokenizer, max_prefill_tokens=24, max_num_seqs=3)
    assert llm.engine.scheduler.max_prefill_tokens == 24 and llm.engine.max_num_seqs == 3
    # three 10-token prompts: the budget of 24 admits two in the first prefill, the third in the next step
    ids = [list(range(5, 15))] * 3
    for i, prompt in enumerate(ids):
        llm.engine.add_request(str(i), prompt, SamplingParams(max_tokens=1, temperature=0))
    kind, first = llm.engine.scheduler.schedule()
    assert kind == "prefill" and len(first) == 2
    with pytest.raises(TypeError, match="max_prefil_tokens"):
        make_llm(tiny_model(seed=1, **WIDE), tokenizer, max_prefil_tokens=24)
