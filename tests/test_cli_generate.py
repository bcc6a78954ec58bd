"""`minimind generate` and `minimind chat` end to end on a tiny random model saved with the real MiniMind3
tokenizer (its chat template opens <think> with --thinking)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from engine.backend import CompletionDelta
from engine.cli.args import add_sampling_arguments, sampling_params_from_args
from engine.cli.chat import Chat, repl
from engine.errors import InvalidRequestError
from minimind.cli import main
from tests.conftest import ROOT, tiny_model

BASE = ["--max-tokens", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, upstream_fixtures):
    path = tmp_path_factory.mktemp("tiny-minimind3")
    tiny_model(seed=3).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind3-dense")).save_pretrained(path)
    return str(path)


def run_json(capsys, *argv: str) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_matches_the_llm_api(model_dir, capsys):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    out = run_json(capsys, "--model", model_dir, "--prompt", "你好，世界", "--temperature", "0", *BASE)
    expected = LLM(model_dir, device="cpu").generate("你好，世界", SamplingParams(temperature=0, max_tokens=12))[0]
    completion = out["completions"][0]
    assert completion["token_ids"] == expected.outputs[0].token_ids
    assert completion["text"] == expected.outputs[0].text
    assert completion["finish_reason"] == "length" and len(completion["token_ids"]) == 12
    assert out["prompt_token_ids"] == expected.prompt_token_ids


def test_streamed_text_equals_the_json_text(model_dir, capsys):
    args = ["--model", model_dir, "--prompt", "hello", "--seed", "11", "--temperature", "1.0", *BASE]
    text = run_json(capsys, *args)["completions"][0]["text"]
    assert main(["generate", *args]) == 0
    captured = capsys.readouterr()
    assert captured.out == text + "\n"
    assert "tokens" in captured.err and "length" in captured.err


def test_stop_string_cuts_the_output(model_dir, capsys):
    args = ["--model", model_dir, "--prompt", "hello", "--temperature", "0", "--max-tokens", "24", "--device", "cpu"]
    text = run_json(capsys, *args)["completions"][0]["text"].replace("\ufffd", "")
    stop = text.strip()[3:5]
    assert len(stop) == 2
    completion = run_json(capsys, *args, "--stop", stop)["completions"][0]
    assert completion["text"] == text[: text.find(stop)]
    assert completion["finish_reason"] == "stop" and completion["stop_reason"] == stop


def test_n_seeded_completions_differ_and_reproduce(model_dir, capsys):
    args = ["--model", model_dir, "--prompt", "hi", "-n", "3", "--seed", "5", "--temperature", "1.5", *BASE]
    first = [c["token_ids"] for c in run_json(capsys, *args)["completions"]]
    second = [c["token_ids"] for c in run_json(capsys, *args)["completions"]]
    assert first == second and len({tuple(ids) for ids in first}) == 3


def test_chat_json_splits_reasoning_when_the_template_opens_think(model_dir, capsys):
    out = run_json(capsys, "--model", model_dir, "--chat", "--thinking", "--prompt", "2+2?", "--seed", "2", *BASE)
    completion = out["completions"][0]
    # The prompt ends inside <think>: an unclosed block is all reasoning.
    assert "</think>" not in completion["text"] and completion["text"].strip()
    assert completion["reasoning"] == completion["text"].strip("\n") and completion["content"] == ""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.decode(out["prompt_token_ids"]).endswith("<think>\n")


def test_bad_flags_are_explained(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--top-p", "2"]) == 1
    assert "--top-p" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--system", "be brief"]) == 1
    assert "--chat" in capsys.readouterr().err


def test_sampling_flags_map_onto_sampling_params():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, max_tokens=99)
    args = parser.parse_args(["--temperature", "0", "--top-k", "5", "--stop", "a", "--stop", "b", "--seed", "3"])
    params = sampling_params_from_args(args)
    assert (params.temperature, params.top_k, params.stop, params.seed, params.max_tokens) == (0, 5, ["a", "b"], 3, 99)
    with pytest.raises(InvalidRequestError, match="--min-p"):
        sampling_params_from_args(parser.parse_args(["--min-p", "3"]))


def test_chat_session_over_a_pipe(model_dir):
    """The real command with stdin piped: two turns, /clear between them, /exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "minimind", "chat", "--model", model_dir, "--seed", "1", *BASE],
        input="hello\n/clear\n你好\n/nope\n/exit\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>> ") == 5
    assert "(conversation cleared)" in proc.stdout and "unknown command /nope" in proc.stdout


class ScriptedLLM:
    """Stands in for the LLM only where a random model cannot be made to think: replays fixed deltas."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.seen: list[list[dict]] = []

    def apply_chat_template(self, messages, kwargs=None) -> str:
        return "<|im_start|>assistant\n"

    def stream(self, messages, params, chat_template_kwargs=None):
        self.seen.append([dict(m) for m in messages])
        for piece in self.pieces:
            yield CompletionDelta(request_id="r", index=0, text=piece, token_ids=[])


def test_chat_shows_reasoning_dimmed_and_keeps_only_the_answer_in_history():
    llm = ScriptedLLM(["<thi", "nk>\nadd them", "</think>\n\n", "It is ", "4."])
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="standard", highlight=False, markup=False)
    chat = Chat(llm, None, "be brief", None, console)
    assert chat.turn("2+2?") == "It is 4."
    shown = buffer.getvalue()
    assert "\x1b[2madd them" in shown and "It is 4." in shown and "<think>" not in shown
    assert chat.history == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]
    chat.turn("and 3+3?")
    assert llm.seen[1][0] == {"role": "system", "content": "be brief"} and len(llm.seen[1]) == 4
    lines = iter(["/clear", "again", "/exit"])
    assert repl(chat, read_line=lambda _: next(lines)) == 0
    assert llm.seen[2] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}]
