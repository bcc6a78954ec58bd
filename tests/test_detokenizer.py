"""Incremental detokenization with a real byte-level BPE tokenizer: UTF-8 split over tokens, stop strings
across token boundaries, stop tokens, min/max tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer, find_stop, stop_hold_length
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(upstream_fixtures):
    return AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind3-dense"))


def stream(tok, text: str, params: SamplingParams, prompt: str = "Q: ", per_step: int = 1):
    """Feed `text`'s tokens a few at a time; returns (deltas, detokenizer)."""
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, tok.encode(prompt), params, eos_token_ids=[tok.eos_token_id])
    deltas = []
    for i in range(0, len(ids), per_step):
        deltas.append(d.add_tokens(ids[i : i + per_step]))
        if d.finished:
            break
    if not d.finished:
        deltas.append(d.finish("length"))
    return deltas, d


def test_chinese_and_emoji_split_over_tokens_never_emit_broken_utf8(tok):
    text = "你好😀世界🎉，模型 ok"
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # the fixture really splits characters
    deltas, d = stream(tok, text, SamplingParams(max_tokens=100))
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text == d.output_text
    assert d.finish_reason == "length" and d.token_ids == ids


def test_stop_string_across_token_boundaries_is_cut_and_never_leaked(tok):
    text = "alpha beta STOPHERE gamma"
    params = SamplingParams(max_tokens=100, stop=["STOPHERE"])
    deltas, d = stream(tok, text, params)
    assert len(tok.encode("STOPHERE")) > 1  # spans several tokens
    assert "".join(deltas) == "alpha beta " == d.output_text
    assert all("S" not in delta for delta in deltas)  # no piece of the stop string ever went out
    assert d.finish_reason == "stop" and d.stop_reason == "STOPHERE"
    assert "STOPHERE" in tok.decode(d.token_ids)
    assert len(d.token_ids) < len(tok.encode(text))  # tokens after the stop are dropped


def test_include_stop_str_in_output(tok):
    params = SamplingParams(max_tokens=100, stop=["beta"], include_stop_str_in_output=True)
    deltas, d = stream(tok, "alpha beta gamma", params, per_step=3)
    assert "".join(deltas) == "alpha beta" and d.stop_reason == "beta"


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tok):
    params = SamplingParams(max_tokens=100, stop=["END!"])
    deltas, d = stream(tok, "wait ENDING here", params)
    assert "".join(deltas) == "wait ENDING here" and d.finish_reason == "length"


def test_earliest_of_several_stop_strings_wins(tok):
    params = SamplingParams(max_tokens=100, stop=["zzz", "世界"])
    deltas, d = stream(tok, "你好世界 zzz", params, per_step=10)
    assert "".join(deltas) == "你好" and d.stop_reason == "世界"


def test_eos_stops_without_text_and_stop_token_id_is_the_reason(tok):
    ids = tok.encode("hi there") + [tok.eos_token_id] + tok.encode(" more")
    d = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=50), eos_token_ids=[tok.eos_token_id])
    assert d.add_tokens(ids) == "hi there"
    assert d.finish_reason == "stop" and d.stop_reason is None and d.token_ids[-1] == tok.eos_token_id
    stop_id = tok.encode(" there")[0]
    d = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=50, stop_token_ids=[stop_id]))
    assert d.add_tokens(ids) == "hi" and d.stop_reason == stop_id


def test_ignore_eos_and_min_tokens_delay_stopping(tok):
    eos = tok.eos_token_id
    d = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=50, ignore_eos=True), eos_token_ids=[eos])
    d.add_tokens([eos] + tok.encode("x"))
    assert not d.finished
    d = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=50, min_tokens=3, stop=["a"]), eos_token_ids=[eos])
    d.add_tokens(tok.encode("a") + [eos])
    assert not d.finished  # neither the stop string nor EOS counts before 3 tokens
    d.add_tokens([eos])
    assert d.finish_reason == "stop" and len(d.token_ids) == 3


def test_detokenize_false_keeps_every_stop_rule_and_makes_no_text(tok):
    """Token ids only: EOS, stop token ids, min_tokens and max_tokens end the output exactly as with text."""
    eos = tok.eos_token_id
    ids = tok.encode("hi there") + [eos] + tok.encode(" more")
    stop_id = tok.encode(" there")[0]
    cases = [
        SamplingParams(max_tokens=50),
        SamplingParams(max_tokens=50, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=50, min_tokens=4),
        SamplingParams(max_tokens=2),
    ]
    for params in cases:
        with_text = IncrementalDetokenizer(tok, [], params, eos_token_ids=[eos])
        params.detokenize = False
        without = IncrementalDetokenizer(tok, [], params, eos_token_ids=[eos])
        assert with_text.add_tokens(ids) != "" and without.add_tokens(ids) == "" and without.finish("length") == ""
        assert without.token_ids == with_text.token_ids and without.token_ids
        assert (without.finish_reason, without.stop_reason) == (with_text.finish_reason, with_text.stop_reason)


def test_stop_strings_without_detokenizing_are_refused():
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="stop strings need the output text") as err:
        SamplingParams(stop=["\n"], detokenize=False)
    assert err.value.param == "stop"


def test_max_tokens_gives_length(tok):
    ids = tok.encode("one two three four five")
    d = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=2))
    text = d.add_tokens(ids)
    assert d.finish_reason == "length" and d.token_ids == ids[:2] and text == tok.decode(ids[:2])


def test_skip_special_tokens_false_shows_them(tok):
    ids = tok.encode("a<|im_start|>b")
    shown = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=50, skip_special_tokens=False))
    hidden = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=50))
    assert shown.add_tokens(ids) == "a<|im_start|>b" and hidden.add_tokens(ids) == "ab"


def test_prompt_context_keeps_leading_space(tok):
    deltas, d = stream(tok, " world", SamplingParams(max_tokens=10), prompt="hello")
    assert d.output_text == " world"


def test_helpers():
    assert stop_hold_length("abc ST", ["STOP"]) == 2
    assert stop_hold_length("abc", ["STOP"]) == 0
    assert stop_hold_length("xx<", ["<a>", "<|end|>"]) == 1
    assert find_stop("a STOP b END", ["END", "STOP"], 0) == (2, "STOP")
    assert find_stop("a STOP", ["STOP"], 3) is None
