"""benchmarks/bench_cpu_quant.py's quality figures: perplexity over windows, and the KL divergence and same-top
share against a reference, checked on distributions whose values are known."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_cpu_quant


def test_kl_divergence_is_taken_from_the_reference_and_same_top_counts_argmax_matches():
    reference = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    other = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    result = bench_cpu_quant.distance(other, reference)
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2  # KL(reference || other), mean
    assert result["kld_vs_bf16"] == pytest.approx(expected, abs=1e-6)
    assert result["same_top_vs_bf16"] == 0.5  # row 0: argmax 0 against 1; row 1: both 0
    assert bench_cpu_quant.distance(reference, reference) == {"kld_vs_bf16": 0.0, "same_top_vs_bf16": 1.0}


def test_score_text_scores_every_token_but_each_windows_first():
    vocab, ids = 5, [1, 2, 3, 4, 0, 1, 2]

    def uniform(chunk: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, chunk.shape[1], vocab)

    ppl, logprobs = bench_cpu_quant.score_text(uniform, ids, window=4)
    assert ppl == pytest.approx(vocab)  # a uniform model's perplexity is the vocabulary size
    assert logprobs.shape == (3 + 2, vocab)  # windows [1 2 3 4] and [0 1 2]: 3 + 2 scored positions
