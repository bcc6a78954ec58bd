"""Reasoning split, whole and streamed, including tags split across deltas and prompts that open <think>."""

from __future__ import annotations

import random

import pytest

from engine.reasoning import ReasoningStreamParser, reasoning_opened_by_prompt, split_reasoning


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        ("<think>\nLet me see.\n</think>\n\nThe answer is 4.", False, ("Let me see.", "The answer is 4.")),
        ("plain answer", False, (None, "plain answer")),
        ("  <think>a</think>b", False, ("a", "b")),
        ("reasoning here\n</think>\n\nanswer", True, ("reasoning here", "answer")),
        ("reasoning here</think>answer", False, ("reasoning here", "answer")),  # prompt opened it, unsaid
        ("<think>\ncut off by max_tokens", False, ("cut off by max_tokens", "")),
        ("still thinking", True, ("still thinking", "")),
        ("<think>\n\n</think>\n\nno thoughts", False, (None, "no thoughts")),
        ("答案<think>不是开头</think>", False, ("答案<think>不是开头", "")),
    ],
)
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, opened=opened) == expected


def run_stream(pieces: list[str], opened: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    parser = ReasoningStreamParser(opened=opened)
    outs = [parser.feed(piece) for piece in pieces] + [parser.flush()]
    return "".join(r for r, _ in outs), "".join(c for _, c in outs), outs


TEXTS = [
    ("<think>\nstep 1\n\nstep 2\n</think>\n\nfinal <b>answer</b>\n", False),
    ("<think>我想想😀</think>答案是四", False),
    ("no reasoning at all, just < and </ symbols", False),
    ("\n<think>\n</thinking is not the tag</think>ok", False),
    ("already inside\n</think>\n\nthe answer", True),
    ("<think>unfinished thought\n\n", False),
    ("<thi", False),
    ("   ", False),
    ("opened and never closed </thi", True),
]


@pytest.mark.parametrize("text, opened", TEXTS)
def test_stream_matches_split_for_every_chunking(text, opened):
    expected_reasoning, expected_content = split_reasoning(text, opened=opened)
    expected = (expected_reasoning or "", expected_content)
    rng = random.Random(0)
    chunkings = [[text], list(text)]  # whole, then one character per delta
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
        bounds = [0] + cuts + [len(text)]
        chunkings.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    for pieces in chunkings:
        reasoning, content, _ = run_stream(pieces, opened)
        assert (reasoning, content) == expected, pieces


def test_tags_split_across_deltas_never_leak():
    _, _, outs = run_stream(["<th", "ink>\nhm", "m</", "thi", "nk>", "\n\nyes"])
    assert all("<" not in r and "<" not in c for r, c in outs)
    assert outs[1] == ("hm", "") and outs[-2] == ("", "yes")


def test_reasoning_streams_before_the_close_tag():
    parser = ReasoningStreamParser()
    assert parser.feed("<think>first") == ("first", "")
    assert parser.feed(" second") == (" second", "")


def test_reasoning_opened_by_prompt():
    assert reasoning_opened_by_prompt("<|im_start|>assistant\n<think>\n")
    assert not reasoning_opened_by_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not reasoning_opened_by_prompt("<|im_start|>assistant\n")
