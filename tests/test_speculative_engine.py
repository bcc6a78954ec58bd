"""Sampled speculative decoding through the engine's request path keeps the target's distribution.

A tiny target (a 64-token vocabulary, so sampling is cheap) and a draft made from it with a perturbed LM head (so proposals are sometimes accepted, sometimes
rejected), sampled with temperature 1 and top-k 3: the first three tokens of 2,000 seeded requests (the first from
the prefill, the next two from one speculative round) are compared with the target's exact joint distribution over
the 27 possible sequences by a chi-square test. The same counts against the draft's own joint distribution fail,
so the test can tell the two apart. Fixed seeds: deterministic.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import AutoTokenizer

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.conftest import tiny_model

TOP_K, REQUESTS = 3, 2000


@pytest.fixture(scope="module")
def tokenizer(upstream_fixtures):
    return AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense"))


@torch.inference_mode()
def joint(model, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under temperature 1 and top-k 3, by enumeration (13 forward passes)."""

    def next_probs(ids: list[int]) -> dict[int, float]:
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        values, tokens = logits.topk(TOP_K)
        return dict(zip(tokens.tolist(), values.softmax(-1).tolist()))

    result = {}
    for t1, p1 in next_probs(prompt).items():
        for t2, p2 in next_probs(prompt + [t1]).items():
            for t3, p3 in next_probs(prompt + [t1, t2]).items():
                result[(t1, t2, t3)] = p1 * p2 * p3
    return result


def chi_square_p_value(counts: dict[tuple[int, ...], int], probs: dict[tuple[int, ...], float]) -> float:
    """Pearson's test of the counts against the probabilities (outcomes outside them count as impossible)."""
    total = sum(counts.values())
    if any(key not in probs for key in counts):
        return 0.0
    stat = sum((counts.get(key, 0) - total * p) ** 2 / (total * p) for key, p in probs.items())
    dof = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_sampled_speculative_decoding_keeps_the_target_distribution(tokenizer):
    target = tiny_model(seed=1, vocab_size=64)
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        draft.lm_head.weight += 0.03 * torch.randn(draft.lm_head.weight.shape, generator=gen)
    prompt = [5, 12, 47, 30, 33, 41, 9]
    params = [
        SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=3, seed=seed, ignore_eos=True)
        for seed in range(REQUESTS)
    ]
    llm = LLM(
        target,
        tokenizer=tokenizer,
        device="cpu",
        max_model_len=64,
        max_num_seqs=256,
        draft_model=draft,
        num_speculative_tokens=2,
    )
    outputs = llm.generate([prompt] * REQUESTS, params)
    counts: dict[tuple[int, ...], int] = {}
    for out in outputs:
        key = tuple(out.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    spec = llm.engine.spec
    assert spec.proposed >= 2 * REQUESTS  # every request took at least one speculative round
    assert 0.2 < spec.acceptance_rate < 0.9  # both acceptance and rejection (residual resampling) happened
    target_joint, draft_joint = joint(target, prompt), joint(draft, prompt)
    assert min(target_joint.values()) * REQUESTS > 5  # every cell is well populated: the test is meaningful
    assert chi_square_p_value(counts, target_joint) > 1e-3
    assert chi_square_p_value(counts, draft_joint) < 1e-6  # the draft's own distribution is told apart


def test_seeded_sampled_speculation_is_reproducible_and_logprob_rows_decode_plainly(tokenizer):
    target = tiny_model(seed=1, initializer_range=0.2)
    draft = tiny_model(seed=8, num_hidden_layers=1, initializer_range=0.2)
    prompts = [[5, 6, 7, 8, 9], list(range(100, 130))]
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=11, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0.8, max_tokens=12, seed=11, logprobs=2, ignore_eos=True)
    llm = LLM(target, tokenizer=tokenizer, device="cpu", max_model_len=64, draft_model=draft)
    first = llm.generate(prompts, [sampled, with_logprobs])
    again = llm.generate(prompts, [sampled, with_logprobs])
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    plain = LLM(target, tokenizer=tokenizer, device="cpu", max_model_len=64)
    alone = plain.generate([prompts[1]], with_logprobs)[0].outputs[0]
    assert first[1].outputs[0].token_ids == alone.token_ids  # the logprobs row took the plain sampler's tokens
    assert [lp.logprob for lp in first[1].outputs[0].logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs])
    assert len(first[0].outputs[0].token_ids) == 12 and llm.engine.spec.proposed > 0


def test_joint_enumeration_covers_every_sequence():
    """The helper's 27 outcomes sum to one (a guard on the reference the main test compares against)."""
    probs = joint(tiny_model(seed=1, vocab_size=64), [5, 6, 7])
    assert len(probs) == TOP_K**3 and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(len(key) == 3 for key in itertools.islice(probs, 3))
