"""The paged KV cache on tiny random models (CPU): the same greedy tokens as the contiguous cache, with and without
prefix reuse and chunked prefill; every block back in the pool after finish, abort and a closed stream; prefix
hits counted; least recently freed cached blocks evicted first."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from engine.block_pool import BlockPool, block_hashes
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.paged_cache import PagedKVCache
from engine.sampling_params import SamplingParams
from tests.conftest import tiny_model

WIDE = dict(initializer_range=0.2)  # logits far apart: greedy never hinges on a near-tie


@pytest.fixture(scope="module")
def tokenizer(upstream_fixtures):
    return AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense"))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, **WIDE)


def greedy(max_tokens: int = 10, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 6400, (n,), generator=gen).tolist() for n in lengths]


def make_llm(model, tokenizer, **kw) -> LLM:
    return LLM(model, tokenizer=tokenizer, device="cpu", max_model_len=kw.pop("max_model_len", 128), **kw)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def pool_of(llm: LLM) -> BlockPool:
    return llm.engine.cache.tables.pool


def assert_pool_full(llm: LLM) -> None:
    tables = llm.engine.cache.tables
    assert tables.pool.num_free == tables.pool.capacity and tables.outstanding == 0
    assert not llm.engine.has_work() and llm.engine.cache.num_free == llm.engine.cache.num_slots
    assert int(tables.tables.abs().sum()) == 0  # every freed row points at the null block


def test_paged_with_prefix_reuse_and_chunks_gives_the_contiguous_greedy_tokens(model, tokenizer):
    """Prompts sharing prefixes (one whole prompt, another's first 33 tokens), in a queue of 3 slots: the same
    tokens from the contiguous cache, the paged cache with prefix reuse (run twice, so the second run hits), and
    the paged cache without reuse and with 7-token chunks."""
    ps = prompts((5, 23, 9, 40, 14, 31))
    ps += [ps[3][:33] + [7, 8, 9], list(ps[3]), ps[3] + [11, 12]]
    expected = token_ids(make_llm(model, tokenizer, max_num_seqs=3).generate(ps, greedy()))
    paged = make_llm(model, tokenizer, max_num_seqs=3, kv_cache="paged")
    assert token_ids(paged.generate(ps, greedy())) == expected
    first = (pool_of(paged).queries, pool_of(paged).hits)
    assert first[0] == sum(map(len, ps)) and first[1] >= 32  # prompts admitted after ps[3] reuse its blocks
    assert token_ids(paged.generate(ps, greedy())) == expected  # now every full block before the last token hits
    assert pool_of(paged).hits - first[1] == sum((len(p) - 1) // 16 * 16 for p in ps)
    assert_pool_full(paged)
    plain = make_llm(model, tokenizer, max_num_seqs=3, kv_cache="paged", enable_prefix_caching=False)
    plain.engine.scheduler.max_prefill_tokens = 7
    assert token_ids(plain.generate(ps, greedy())) == expected and pool_of(plain).hits == 0
    assert_pool_full(plain)


def test_n_completions_and_speculation_on_paged_blocks(model, tokenizer):
    ps = prompts((21, 9))
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=8, n=3, ignore_eos=True)
    contiguous, paged = (make_llm(model, tokenizer, max_num_seqs=4, kv_cache=k) for k in ("contiguous", "paged"))
    assert [[c.token_ids for c in o.outputs] for o in paged.generate(ps, sampled)] == [
        [c.token_ids for c in o.outputs] for o in contiguous.generate(ps, sampled)
    ]
    assert_pool_full(paged)
    draft = tiny_model(seed=8, num_hidden_layers=1, **WIDE)
    spec = make_llm(model, tokenizer, max_num_seqs=2, kv_cache="paged", draft_model=draft, num_speculative_tokens=3)
    spec.engine.scheduler.max_prefill_tokens = 8  # the draft prefills the same chunks
    assert token_ids(spec.generate(ps, greedy())) == token_ids(contiguous.generate(ps, greedy()))
    assert_pool_full(spec)


def test_blocks_come_back_on_finish_abort_and_a_closed_stream(model, tokenizer):
    llm = make_llm(model, tokenizer, max_num_seqs=2, kv_cache="paged")
    core, pool = llm.engine, pool_of(llm)
    a, b, c = prompts((20, 30, 10))
    core.add_request("a", a, greedy(50))
    core.add_request("b", b, greedy(50))
    core.add_request("c", c, greedy(50))  # waits: two slots
    core.step()
    core.step()
    held = pool.capacity - pool.num_free
    assert held == 2 + 2 and len(core.scheduler.waiting) == 1  # blocks for the tokens so far, not for 128
    assert core.abort("a")[0].finish_reason == "abort"
    assert core.abort("c")[0].finish_reason == "abort" and not core.scheduler.waiting
    core.abort("b")
    assert_pool_full(llm)
    stream = llm.stream(a, greedy(50))
    assert next(stream).token_ids and pool.num_free < pool.capacity
    stream.close()
    assert_pool_full(llm)
    llm.generate([a, b], greedy(5))
    assert_pool_full(llm)


def test_memory_bounds_tokens_not_sequences(model, tokenizer):
    """A pool of 16 blocks (256 positions): eight 20-token requests with max_tokens 8 (2 blocks each) run at once,
    where the contiguous cache of the same memory holds two 128-token slots."""
    per_block = PagedKVCache.bytes_per_block(2, 2, 16, torch.float32)  # the tiny model: 2 layers, 2 kv heads of 16
    llm = make_llm(model, tokenizer, max_num_seqs=8, kv_cache="paged", kv_cache_memory=16 * per_block)
    assert pool_of(llm).capacity == 16
    for i, p in enumerate(prompts([20] * 8)):
        llm.engine.add_request(str(i), p, greedy(8))
    kind, batch = llm.engine.scheduler.schedule()
    assert kind == "prefill" and len(batch) == 8
    contiguous = make_llm(model, tokenizer, max_num_seqs=8, kv_cache_memory=16 * per_block)
    assert contiguous.engine.cache.num_slots == 2


def test_chunked_prefill_equals_unchunked_and_lets_decodes_step(model, tokenizer):
    short, long = prompts((6, 70))
    for kv_cache in ("contiguous", "paged"):
        whole = make_llm(model, tokenizer, max_num_seqs=2, kv_cache=kv_cache)
        chunked = make_llm(model, tokenizer, max_num_seqs=2, kv_cache=kv_cache, max_prefill_tokens=16)
        # logits of the last prompt position: one 70-token prefill vs five chunks
        runs = []
        for llm in (whole, chunked):
            seq = llm.engine.add_request("x", long, greedy(1))[0]
            logits = []
            while not seq.is_prefilled:
                kind, seqs = llm.engine.scheduler.schedule()
                done, last = llm.engine._prefill(seqs)
                if done:
                    logits.append(last[0])
            runs.append(logits[0])
            llm.engine.abort("x")
        torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)
        assert token_ids(chunked.generate([short, long], greedy())) == token_ids(
            whole.generate([short, long], greedy())
        )
        # a running stream steps between the chunks of a long prompt that arrives later
        core = chunked.engine
        core.add_request("s", short, greedy(30))
        core.step()
        core.add_request("l", prompts((70,), seed=1)[0], greedy(1))
        steps = []
        schedule = core.scheduler.schedule

        def recording(schedule=schedule, steps=steps):
            kind, seqs = schedule()
            steps.append(kind + ":" + ",".join(s.request_id for s in seqs))
            return kind, seqs

        core.scheduler.schedule = recording
        while core.has_work():
            core.step()
        assert steps[:10] == ["prefill:l", "decode:s"] * 4 + ["prefill:l", "decode:s,l"]


def test_bad_kv_cache_layout_is_a_clear_error(model, tokenizer):
    with pytest.raises(InvalidRequestError, match="kv_cache must be one of contiguous, paged, got 'pages'"):
        make_llm(model, tokenizer, kv_cache="pages")


def test_block_pool_shares_counts_and_evicts_least_recently_freed():
    pool = BlockPool(num_blocks=5, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    hashes = block_hashes(tokens, 2)
    assert hashes == block_hashes(list(tokens), 2) and block_hashes([9, 2, 3, 4], 2)[1] != hashes[1]
    assert block_hashes(tokens, 2, hashes[0], 2) == hashes[1:]  # chained from a parent = the same chain
    first = [pool.take() for _ in hashes]
    for block, h in zip(first, hashes):
        pool.register(block, h)
    assert pool.lookup(hashes) == first and pool.lookup([hashes[0], 12345]) == first[:1]
    pool.share(first[0])
    assert pool.ref_count[first[0]] == 2
    pool.release(first)  # block 0 still held once; the other two free but still cached
    assert pool.num_free == 3 and pool.lookup(hashes) == first
    pool.release(first[:1])
    # freed tail first: the last block of the prefix is evicted before its first
    other = pool.take()  # the never-used block 4
    assert other not in first and pool.lookup(hashes) == first
    evicted = pool.take()
    assert evicted == first[2] and pool.lookup(hashes) == first[:2]


def test_prefix_cache_counters_reach_the_metrics_page(model, tokenizer):
    """The engine's counters as the server's /metrics renders them, under vLLM's names with our prefix."""
    from server.metrics import ServerMetrics

    llm = make_llm(model, tokenizer, kv_cache="paged")
    prompt = prompts((40,))[0]
    llm.generate([prompt, prompt + [5]], greedy(2))
    llm.generate([prompt], greedy(2))

    class EngineStatsOnly:  # the one call ServerMetrics makes at scrape time, answered by the real engine
        stats = llm.engine.stats

    page = ServerMetrics(EngineStatsOnly(), "m").render().decode()
    stats = llm.engine.stats()
    # the first two prompts are prefilled together (nothing cached yet); the third finds 2 blocks of the first
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (121, 32)
    assert 'minimind:prefix_cache_queries_total{model_name="m"} 121.0' in page
    assert 'minimind:prefix_cache_hits_total{model_name="m"} 32.0' in page


def test_a_follow_up_turn_reuses_the_blocks_of_the_reply(model, tokenizer):
    """Turn 2 re-sends turn 1's prompt and reply: every full block of them (all but the reply's last token, whose
    keys were never computed) is found, and the tokens are those of the contiguous cache."""
    prompt = prompts((40,))[0]
    llm = make_llm(model, tokenizer, kv_cache="paged")
    reply = token_ids(llm.generate([prompt], greedy(30)))[0]
    follow_up = prompt + reply + [5, 6]
    before = pool_of(llm).hits
    second = token_ids(llm.generate([follow_up], greedy(8)))[0]
    assert pool_of(llm).hits - before == (40 + 30 - 1) // 16 * 16
    assert second == token_ids(make_llm(model, tokenizer).generate([follow_up], greedy(8)))[0]
    assert_pool_full(llm)


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_compiled_bucketed_steps_leave_a_prompt_between_chunks_intact(model, tokenizer, kv_cache):
    """The compiled (on a GPU: graph-captured) decode step runs every row of its batch bucket, including the slot of
    a prompt waiting for its next chunk; that row's junk write must not land in the prompt's positions. torch.compile
    on the CPU takes the same bucketed path as CUDA graphs (about a minute to compile here)."""
    short, long = prompts((6, 90))
    outputs = []
    for compiled in (False, True):
        llm = make_llm(
            model,
            tokenizer,
            max_model_len=256,
            max_num_seqs=4,
            kv_cache=kv_cache,
            compile_model=compiled,
            max_prefill_tokens=16,
        )
        core, tokens = llm.engine, {}
        core.add_request("s", short, greedy(40))
        core.step()
        core.step()
        core.add_request("l", long, greedy(40))
        while core.has_work():
            for delta in core.step():
                tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        outputs.append(tokens)
    assert outputs[0] == outputs[1] and len(outputs[0]["l"]) == 40


@pytest.mark.slow
def test_two_compiled_engines_in_one_process_each_run_their_own_weights(tokenizer):
    """On the CPU the compiled step keeps only the weights' identity among its guards on the model
    (engine/model_runner.py weight_identity_guards); that identity is what keeps a second engine in the process off
    the first one's compiled code, whose weights are frozen in. Each compiled engine gives its own eager tokens."""
    runs = {}
    for compiled in (False, True):
        for seed in (1, 2):
            llm = make_llm(tiny_model(seed=seed, **WIDE), tokenizer, max_num_seqs=2, compile_model=compiled)
            runs[compiled, seed] = token_ids(llm.generate(prompts((4, 3)), greedy(12)))
    assert runs[False, 1] != runs[False, 2]
    assert runs[True, 1] == runs[False, 1] and runs[True, 2] == runs[False, 2]


def test_kv_cache_flags_reach_the_engine_config(capsys):
    import argparse

    from engine.cli.args import add_model_arguments, engine_config_from_args
    from server import settings as server_settings

    def parse(argv: list[str], env: dict[str, str]) -> server_settings.Settings:
        serve = argparse.ArgumentParser()
        server_settings.add_arguments(serve)
        return server_settings.from_args(serve.parse_args(argv), env)

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["--kv-cache", "paged", "--no-enable-prefix-caching"]))
    assert (config.kv_cache, config.enable_prefix_caching) == ("paged", False)
    assert engine_config_from_args(parser.parse_args([])).kv_cache == "contiguous"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache", "pages"])
    assert "invalid choice: 'pages'" in capsys.readouterr().err
    served = parse(["--kv-cache", "paged", "--no-enable-prefix-caching"], {})
    assert (served.kv_cache, served.enable_prefix_caching) == ("paged", False)
    assert parse([], {"MINIMIND_KV_CACHE": "paged"}).kv_cache == "paged" and parse([], {}).kv_cache == "contiguous"
    with pytest.raises(server_settings.SettingsError, match="MINIMIND_KV_CACHE='pages': choose one of contiguous"):
        parse([], {"MINIMIND_KV_CACHE": "pages"})
