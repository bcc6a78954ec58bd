"""Rewards for the RL stages: a few rule rewards by name, and any Python function by import path, summed with
the weights of the `rewards:` config mapping, e.g. `rewards: {exact_match: 1.0, format: 0.2}` or
`rewards: {"my_rewards:score": 1.0}`.

`reward_model` is a local sequence-classification model (training/reward_model.py; its directory in the
`reward_model:` field). A reward function takes one `Sample` (the conversation, the ground-truth answer if the data line has one, the
completion's text and tokens) and returns a float. Rule rewards read the final answer as the text after the
last `</think>` (with `<answer>` tags stripped), so reasoning models and plain ones are scored alike.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.tool_calls import parse_tool_calls
from training.errors import TrainingError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
THINK_THEN_ANSWER = re.compile(r"^\s*<think>(.*?)</think>\s*(\S.*)$", re.DOTALL)


@dataclass
class Sample:
    """One completion as a reward function sees it."""

    messages: list[dict[str, Any]]
    answer: str | None
    completion: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    max_tokens: int = 0
    tool_calls: list[Any] = field(default_factory=list)  # the agent stage's calls (training/tools.py ToolResult)


RewardFn = Callable[[Sample], float]


def final_answer(text: str) -> str:
    """The part of a completion that is the answer: after the last </think>, without <answer> tags."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.replace("<answer>", "").replace("</answer>", "").strip()


def exact_match(sample: Sample) -> float:
    """1 when the final answer equals the ground truth (surrounding whitespace ignored), else 0."""
    return float(sample.answer is not None and final_answer(sample.completion) == sample.answer.strip())


def numeric_match(sample: Sample) -> float:
    """1 when the last number in the final answer equals the ground truth's number (to 1e-6), else 0."""
    if sample.answer is None:
        return 0.0
    found, truth = NUMBER.findall(final_answer(sample.completion)), NUMBER.findall(sample.answer)
    if not found or not truth:
        return 0.0
    return float(math.isclose(float(found[-1]), float(truth[-1]), rel_tol=1e-6, abs_tol=1e-6))


def think_format(sample: Sample) -> float:
    """1 for `<think>...</think>` followed by a non-empty answer, with one </think> only, else 0."""
    return float(THINK_THEN_ANSWER.match(sample.completion) is not None and sample.completion.count("</think>") == 1)


def length_penalty(sample: Sample) -> float:
    """-(completion tokens / max_tokens), in [-1, 0]: with a small weight, prefers the shorter of equal answers."""
    return -len(sample.token_ids) / max(sample.max_tokens, 1)


def repetition_penalty(sample: Sample, n: int = 3) -> float:
    """-(fraction of the completion's token n-grams that repeat an earlier one), in [-1, 0]."""
    ids = sample.token_ids
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return -(len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def tool_call_validity(sample: Sample) -> float:
    """1 when the completion made tool calls and every one was well-formed (agent stage: parsed, a known tool,
    ran without error; other stages: every `<tool_call>` block parses), else 0."""
    if sample.tool_calls:
        return float(all(result.ok for result in sample.tool_calls))
    return float(bool(parse_tool_calls(sample.completion)[1]))


RULES: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "format": think_format,
    "length": length_penalty,
    "repetition": repetition_penalty,
    "tool_call": tool_call_validity,
}


def resolve(name: str) -> RewardFn:
    """A rule by name, or `module:function` imported from the Python path."""
    if name in RULES:
        return RULES[name]
    if ":" not in name:
        raise TrainingError(
            f"unknown reward {name!r} in rewards:; use one of {', '.join(RULES)}, reward_model or a Python function "
            "as module:function"
        )
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise TrainingError(f"reward {name!r}: cannot import it ({err}); check the module is on PYTHONPATH") from None
    if not callable(fn):
        raise TrainingError(f"reward {name!r} is not a function")
    return fn


class RewardSet:
    """The weighted rewards of a config: `score` gives the total per sample and each reward's own value."""

    def __init__(self, weights: dict[str, float], reward_model: str = "") -> None:
        if not weights:
            raise TrainingError("rewards: is empty; give at least one, e.g. rewards: {exact_match: 1.0}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.fns = {name: self.resolve(name, reward_model) for name in self.weights}

    @staticmethod
    def resolve(name: str, reward_model: str) -> RewardFn:
        if name == "reward_model":
            from training.reward_model import RewardModel

            return RewardModel(reward_model)
        return resolve(name)

    def to(self, device: Any) -> RewardSet:
        """Move the model-based rewards to the policy's device."""
        for fn in self.fns.values():
            if hasattr(fn, "to"):
                fn.to(device)
        return self

    def score(self, samples: list[Sample]) -> tuple[list[float], dict[str, list[float]]]:
        parts = {
            name: [float(v) for v in fn.score_batch(samples)]
            if hasattr(fn, "score_batch")  # a model scores the whole batch in a few forwards
            else [float(fn(sample)) for sample in samples]
            for name, fn in self.fns.items()
        }
        totals = [sum(self.weights[name] * parts[name][i] for name in parts) for i in range(len(samples))]
        return totals, parts
