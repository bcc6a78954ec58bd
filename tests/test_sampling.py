"""Each sampling control against a straightforward reference on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import (
    SamplingTensors,
    process_logits,
    record_tokens,
    row_seed,
    row_uniform,
    sample,
    sample_from_probs,
    token_counts,
    uniform_noise,
)
from engine.sampling_params import SamplingParams

V = 12
# Well separated values so no reference boundary falls on a floating-point tie.
LOGITS = torch.tensor([[2.0, 0.5, -1.0, 3.1, 0.0, 1.2, -2.5, 2.6, -0.3, 0.9, 1.7, -4.0]])


def tensors(*params: SamplingParams, **kw) -> SamplingTensors:
    return SamplingTensors.from_params(list(params), V, **kw)


def steps(n: int, value: int = 0) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.int64)


def kept(params: SamplingParams, logits: torch.Tensor = LOGITS) -> set[int]:
    _, processed = process_logits(logits, tensors(params), steps(1))
    return {i for i in range(V) if math.isfinite(processed[0, i].item())}


def softmax_list(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def reference_top_k(values: list[float], k: int) -> set[int]:
    return set(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def reference_top_p(values: list[float], p: float, allowed: set[int] | None = None) -> set[int]:
    allowed = set(range(len(values))) if allowed is None else allowed
    ids = sorted(allowed, key=lambda i: -values[i])
    probs = softmax_list([values[i] for i in ids])
    keep, mass = set(), 0.0
    for i, prob in zip(ids, probs):
        keep.add(i)
        mass += prob
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("k", [1, 3, 5, 11])
def test_top_k_keeps_the_k_largest(k):
    assert kept(SamplingParams(top_k=k)) == reference_top_k(LOGITS[0].tolist(), k)


def test_top_k_off_keeps_everything():
    assert kept(SamplingParams(top_k=0)) == set(range(V))
    assert kept(SamplingParams(top_k=-1)) == set(range(V))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_top_p_keeps_the_smallest_set_reaching_p(p, temperature):
    scaled = [v / temperature for v in LOGITS[0].tolist()]
    assert kept(SamplingParams(top_p=p, temperature=temperature)) == reference_top_p(scaled, p)


def test_top_p_applies_to_the_distribution_left_by_top_k():
    values = LOGITS[0].tolist()
    expected = reference_top_p(values, 0.7, allowed=reference_top_k(values, 4))
    assert kept(SamplingParams(top_k=4, top_p=0.7)) == expected


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.5])
def test_min_p_drops_tokens_below_a_fraction_of_the_best(min_p):
    probs = softmax_list(LOGITS[0].tolist())
    expected = {i for i, prob in enumerate(probs) if prob >= min_p * max(probs)}
    assert kept(SamplingParams(min_p=min_p)) == expected


def test_repetition_presence_and_frequency_penalties_match_reference():
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    prompt, output = [0, 2, 2], [3, 3, 4, 6]
    values = LOGITS[0].tolist()
    expected = []
    for i, value in enumerate(values):
        if i in prompt or i in output:
            value = value / 1.3 if value > 0 else value * 1.3
        count = output.count(i)
        value -= 0.25 * count + 0.5 * (count > 0)
        expected.append(value)
    prompt_mask = token_counts([prompt], V) > 0
    counts = token_counts([output], V)
    penalised, _ = process_logits(LOGITS, tensors(params), steps(1, 4), prompt_mask, counts)
    assert torch.allclose(penalised[0], torch.tensor(expected), atol=1e-6)


def test_penalties_change_the_greedy_choice():
    counts = token_counts([[3]], V)  # token 3 is the argmax; penalise it below token 7
    t = tensors(SamplingParams(temperature=0, presence_penalty=1.0))
    assert sample(LOGITS, t, steps(1, 1), None, counts).token_ids.item() == 7
    assert sample(LOGITS, tensors(SamplingParams(temperature=0)), steps(1)).token_ids.item() == 3


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.full((1, V), -5.0)
    logits[0, 5], logits[0, 9], logits[0, 1] = 10.0, 9.0, 8.0  # eos=5, stop id 9, then 1
    params = SamplingParams(temperature=0, min_tokens=3, max_tokens=10, stop_token_ids=[9])
    t = tensors(params, eos_token_ids=[5])
    assert sample(logits, t, steps(1, 2)).token_ids.item() == 1
    assert sample(logits, t, steps(1, 3)).token_ids.item() == 5
    t_ignore = tensors(SamplingParams(temperature=0, min_tokens=3, max_tokens=10, ignore_eos=True), eos_token_ids=[5])
    assert sample(logits, t_ignore, steps(1, 0)).token_ids.item() == 5  # EOS is not a stop when ignored


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    t = tensors(*[SamplingParams(temperature=0, seed=s) for s in range(4)])
    assert torch.equal(sample(logits, t, steps(4)).token_ids, logits.argmax(dim=-1))


def draw_sequence(params: SamplingParams, logits: torch.Tensor, n_steps: int, **kw) -> list[int]:
    t = tensors(params, **kw)
    return [sample(logits, t, steps(1, s)).token_ids.item() for s in range(n_steps)]


def test_seed_reproduces_the_same_samples():
    flat = torch.zeros(1, V)
    a = draw_sequence(SamplingParams(seed=42), flat, 30)
    assert a == draw_sequence(SamplingParams(seed=42), flat, 30)
    assert a != draw_sequence(SamplingParams(seed=43), flat, 30)


def test_unseeded_requests_still_sample_randomly():
    flat = torch.zeros(1, V)
    assert draw_sequence(SamplingParams(), flat, 30) != draw_sequence(SamplingParams(), flat, 30)


def test_a_request_does_not_depend_on_its_batch_neighbours():
    gen = torch.Generator().manual_seed(1)
    own = torch.randn(1, V, generator=gen)
    params = SamplingParams(seed=7, top_p=0.9, temperature=0.8)
    alone = draw_sequence(params, own, 20)
    # Same request in a batch of 5 with other settings, at row 3, joining at different steps.
    others = [SamplingParams(seed=1), SamplingParams(temperature=0), SamplingParams(top_k=2), params, SamplingParams()]
    t = tensors(*others)
    batched = []
    for s in range(20):
        logits = torch.randn(5, V, generator=gen)
        logits[3] = own[0]
        lens = torch.tensor([s + 5, 0, s * 2, s, 3])
        batched.append(sample(logits, t, lens).token_ids[3].item())
    assert batched == alone


def test_n_completions_of_one_seeded_request_differ_and_reproduce():
    flat = torch.zeros(1, V)
    seqs = [draw_sequence(SamplingParams(seed=5), flat, 20, sample_indices=[i]) for i in range(4)]
    assert len({tuple(s) for s in seqs}) == 4
    assert seqs[0] == draw_sequence(SamplingParams(seed=5), flat, 20)  # index 0 keeps the request's seed
    assert seqs[2] == draw_sequence(SamplingParams(seed=5), flat, 20, sample_indices=[2])


def test_row_seed_without_seed_is_random_and_with_seed_fixed():
    assert row_seed(None) != row_seed(None)
    assert row_seed(9, 0) == 9 and row_seed(9, 1) == row_seed(9, 1) != 9


def test_sampled_frequencies_match_the_truncated_distribution():
    """20,000 seeded rows, one step each: frequencies follow softmax(logits / T) restricted by top-k."""
    rows = 20_000
    params = [SamplingParams(seed=s, temperature=0.8, top_k=5) for s in range(rows)]
    t = SamplingTensors.from_params(params, V)
    tokens = sample(LOGITS.expand(rows, V), t, steps(rows)).token_ids
    freq = torch.bincount(tokens, minlength=V).double() / rows
    allowed = reference_top_k(LOGITS[0].tolist(), 5)
    scaled = [LOGITS[0, i].item() / 0.8 if i in allowed else -math.inf for i in range(V)]
    expected = torch.tensor(softmax_list(scaled), dtype=torch.float64)
    assert 0.5 * (freq - expected).abs().sum().item() < 0.02  # total variation distance
    assert all(freq[i] == 0 for i in range(V) if i not in allowed)


def test_uniform_noise_is_uniform_and_keyed():
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50_000)
    assert 0 < u.min().item() and u.max().item() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 1 / math.sqrt(12)) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(torch.tensor([1]), torch.tensor([0]), 50_000)
    assert torch.equal(u[0], again[0])


def test_sample_from_probs_is_the_inverse_cdf():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).expand(7, 6)
    u = torch.tensor([1e-7, 0.19, 0.21, 0.69, 0.71, 0.999, 1.0])
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3, 4, 4, 4]  # zero-probability tokens never
    assert sample_from_probs(probs * 3, u).tolist() == [1, 1, 3, 3, 4, 4, 4]  # unnormalised is fine


def test_row_uniform_is_uniform_over_seeds_and_over_steps():
    over_seeds = row_uniform(torch.arange(50_000), torch.zeros(50_000, dtype=torch.int64))
    over_steps = row_uniform(torch.full((50_000,), 12345), torch.arange(50_000))
    for u in (over_seeds, over_steps):
        assert 0 < u.min().item() and u.max().item() < 1
        assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 1 / math.sqrt(12)) < 0.01
        assert torch.histc(u, bins=10, min=0, max=1).min().item() > 4_700  # about 5,000 per bin
    assert not torch.equal(row_uniform(torch.arange(5), torch.zeros(5), salt=1), over_seeds[:5])


def test_logprobs_are_of_the_raw_distribution_with_top_n():
    raw = LOGITS.log_softmax(dim=-1)[0]
    t = tensors(SamplingParams(temperature=0.5, top_k=2, seed=3, logprobs=3))
    out = sample(LOGITS, t, steps(1))
    token = out.token_ids.item()
    assert out.logprobs.item() == pytest.approx(raw[token].item(), abs=1e-6)
    assert out.top_token_ids[0].tolist() == raw.topk(3).indices.tolist()
    assert torch.allclose(out.top_logprobs[0], raw.topk(3).values)
    assert sample(LOGITS, tensors(SamplingParams()), steps(1)).logprobs is None


def test_record_tokens_updates_the_histogram():
    counts = token_counts([[1, 1], []], V)
    record_tokens(counts, torch.tensor([1, 4]))
    assert counts[0, 1].item() == 3 and counts[1, 4].item() == 1 and counts.sum().item() == 4


def test_all_features_tensors_give_the_same_result():
    params = [SamplingParams(seed=3), SamplingParams(temperature=0), SamplingParams(seed=4, min_p=0.1)]
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    a = sample(logits, tensors(*params), steps(3, 2)).token_ids
    b = sample(logits, tensors(*params, all_features=True), steps(3, 2), torch.zeros(3, V, dtype=torch.bool)).token_ids
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sample_runs_inside_a_cuda_graph_with_the_eager_result():
    """Captured once with every stage on, replayed for new logits and steps: same tokens as eager."""
    batch, vocab, device = 8, 1000, "cuda"
    params = [
        SamplingParams(seed=i, temperature=0 if i % 3 == 0 else 0.9, top_k=i * 7, top_p=0.9, min_p=0.02 * (i % 2))
        for i in range(batch)
    ]
    t = SamplingTensors.from_params(params, vocab, device, eos_token_ids=[2], all_features=True)
    logits = torch.randn(batch, vocab, device=device)
    lens = torch.zeros(batch, dtype=torch.int64, device=device)
    prompt_mask = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(batch, vocab, dtype=torch.int32, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the graph
            sample(logits, t, lens, prompt_mask, counts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sample(logits, t, lens, prompt_mask, counts).token_ids
    gen = torch.Generator(device=device).manual_seed(0)
    for step in range(5):
        logits.copy_(torch.randn(batch, vocab, device=device, generator=gen))
        lens.fill_(step)
        graph.replay()
        expected = sample(logits, t, lens, prompt_mask, counts).token_ids
        assert torch.equal(static_out, expected)
        record_tokens(counts, expected)


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(seed=3, logprobs=0, logprobs_mode="processed")] * 3,  # a rollout batch: all processed
        [SamplingParams(seed=3), SamplingParams(temperature=0, logprobs=2), SamplingParams(seed=5, top_p=0.8)],
        [SamplingParams(seed=7, logprobs=1, logprobs_mode="processed"), SamplingParams(seed=8, logprobs=1)],
    ],
)
def test_the_engine_sampler_draws_on_the_host_what_sample_draws_on_the_device(params):
    """engine/sampler.py hashes each row's (seed, step) into its uniform number on the host and skips the stages
    no row needs; the tokens and logprobs equal those of `sample()` drawing the same numbers itself."""
    from engine.sampler import Sampler
    from engine.sequence import Sequence

    seqs = [Sequence("r", i, [1, 2], p, 100) for i, p in enumerate(params)]
    sampler = Sampler(V, [0], torch.device("cpu"))
    reference = SamplingTensors.from_params(params, V, eos_token_ids=[0], sample_indices=[s.index for s in seqs])
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        logits = torch.randn(len(seqs), V, generator=gen) * 2
        for s in seqs:
            s.output_token_ids = [4] * step
        ours = sampler(seqs, logits)
        reference.seeds = sampler.tensors(seqs).seeds  # unseeded rows drew their seed when the tensors were built
        expected = sample(logits, reference, steps(len(seqs), step))
        assert torch.equal(ours.token_ids, expected.token_ids)
        for a, b in [(ours.logprobs, expected.logprobs), (ours.top_logprobs, expected.top_logprobs)]:
            assert (a is None and b is None) or torch.equal(a, b)


def test_the_engine_sampler_makes_each_sequences_row_once_and_restacks_rows_when_the_batch_changes():
    """Many streams coming and going change the batch nearly every step: the sampler keeps each sequence's row (an
    unseeded one keeps the seed it drew) and only restacks them, into the tensors `from_params` makes."""
    from engine.sampler import Sampler
    from engine.sequence import Sequence

    params = [
        SamplingParams(seed=3, top_k=5),
        SamplingParams(temperature=0, stop_token_ids=[7, 9]),
        SamplingParams(),  # unseeded
        SamplingParams(seed=4, top_p=0.5, min_p=0.1, repetition_penalty=1.2, min_tokens=2, logprobs=1),
    ]
    seqs = [Sequence("r", i % 2, [1, 2], p, 100) for i, p in enumerate(params)]
    sampler = Sampler(V, [0], torch.device("cpu"))
    first = sampler.tensors(seqs)
    unseeded_seed = first.seeds[2].item()
    assert sampler.tensors(seqs[1:]).seeds[1].item() == unseeded_seed  # batch changed: the row, seed and all, kept
    again = sampler.tensors(seqs)
    reference = SamplingTensors.from_params(params, V, eos_token_ids=[0], sample_indices=[s.index for s in seqs])
    for name in ("temperature", "greedy", "top_k", "top_p", "min_p", "repetition_penalty", "min_tokens", "stop_ids"):
        assert torch.equal(getattr(again, name), getattr(reference, name)), name
    assert again.seeds[2].item() == unseeded_seed and torch.equal(again.seeds[[0, 3]], reference.seeds[[0, 3]])
    flags = ("do_penalties", "do_top_k", "do_top_p", "do_min_p", "do_min_tokens", "all_greedy", "any_greedy")
    assert [getattr(again, f) for f in flags] == [getattr(reference, f) for f in flags] == [True] * 5 + [False, True]
    assert again.num_logprobs == reference.num_logprobs == 1
