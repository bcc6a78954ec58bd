"""The chat page (webui/app.py) driven by Streamlit's AppTest against a live `minimind serve` on 127.0.0.1.

Two tiny models with the real MiniMind-3 tokenizer are served: one with random weights (answers are noise,
but every request goes the whole way: template, engine, stream, usage), and one trained here for a few
seconds to answer one question with a `<think>` block, so the page's thinking block shows real reasoning.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, UPSTREAM_FIXTURES, tiny_model

APP = str(ROOT / "webui" / "app.py")
THINK_QUESTION = "Why is the sky blue?"
THINK_REASONING = "Light scatters."
THINK_ANSWER = "Because of Rayleigh scattering."
APP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save(model, tokenizer, folder: Path) -> Path:
    from transformers import GenerationConfig

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return folder


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(UPSTREAM_FIXTURES / "minimind3-dense")


def _train_thinking_model(tokenizer):
    """A tiny model that memorises one reply with reasoning: `<think>` is opened by the template (thinking on),
    the model writes the reasoning, `</think>`, the answer and `<|im_end|>`."""
    torch.manual_seed(0)
    model = tiny_model(seed=0).train()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": THINK_QUESTION}], tokenize=False, add_generation_prompt=True, open_thinking=True
    )
    assert prompt.endswith("<think>\n")
    reply = f"{THINK_REASONING}\n</think>\n\n{THINK_ANSWER}<|im_end|>"
    ids = tokenizer(prompt + reply, return_tensors="pt", add_special_tokens=False).input_ids
    labels = ids.clone()
    labels[:, : len(tokenizer(prompt, add_special_tokens=False).input_ids)] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, f"the thinking model did not learn its reply (loss {loss.item():.3f})"
    return model.eval()


class LiveServer:
    """`minimind serve` in a subprocess on a free 127.0.0.1 port; its log is shown when it fails to start."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "minimind", "serve", "--model", str(model_dir), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--max-model-len", "512", "--max-num-seqs", "4", "--device", "cpu", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", MINIMIND_HOME=str(log_path.parent / "home"))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"minimind serve exited with {self.proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"minimind serve not healthy within 180 s:\n{log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("webui-models")
    tokenizer = _tokenizer()
    return {
        "random": _save(tiny_model(seed=1), tokenizer, root / "tiny-random"),
        "thinking": _save(_train_thinking_model(tokenizer), tokenizer, root / "tiny-thinking"),
    }


@pytest.fixture(scope="module")
def server(models, tmp_path_factory) -> Iterator[LiveServer]:
    live = LiveServer(models["random"], tmp_path_factory.mktemp("server") / "serve.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def thinking_server(models, tmp_path_factory) -> Iterator[LiveServer]:
    live = LiveServer(models["thinking"], tmp_path_factory.mktemp("server-thinking") / "serve.log")
    yield live
    live.stop()


def _app(base: str, key: str = "none"):
    from streamlit.testing.v1 import AppTest

    os.environ["MINIMIND_API_BASE"] = base
    os.environ["MINIMIND_API_KEY"] = key
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    assert not at.exception, at.exception
    at.slider(key="temperature").set_value(0.0)
    at.number_input(key="max_tokens").set_value(12)
    return at.run()


def _send(at, text: str):
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception
    return at


def _history(at) -> list[dict]:
    return at.session_state["history"]


@pytest.fixture(autouse=True)
def _restore_env():
    saved = {k: os.environ.get(k) for k in ("MINIMIND_API_BASE", "MINIMIND_API_KEY")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_message_gets_a_streamed_answer_with_usage(server):
    at = _app(server.base)
    assert at.selectbox(key="model").value == "tiny-random"
    assert not at.error, [e.value for e in at.error]
    _send(at, "Hello there")
    user, answer = _history(at)
    assert user == {"role": "user", "content": "Hello there"}
    assert answer["content"] and not answer.get("error")
    assert answer["completion_tokens"] == 12  # max_tokens, from the stream's usage chunk
    # The page shows the question, the answer and the stats line under it.
    bubbles = at.chat_message
    assert [b.name for b in bubbles] == ["user", "assistant"]
    assert bubbles[0].markdown[0].value == "Hello there"
    # st.markdown drops the leading and trailing whitespace the random model may produce.
    assert bubbles[1].markdown[0].value.strip() == answer["content"].strip()
    assert any("12 completion tokens" in c.value and "tok/s" in c.value for c in bubbles[1].caption)
    assert not at.error


def test_history_length_control_limits_what_the_server_receives(server):
    tokenizer = _tokenizer()
    at = _app(server.base)
    at.text_area(key="system_prompt").set_value("Be brief.")
    at.slider(key="history_turns").set_value(1).run()
    for text in ("first question", "second question", "third question"):
        _send(at, text)
    history = _history(at)
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    # What the server saw is measured by its own count of prompt tokens (usage.prompt_tokens).
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": history[3]["content"]},
        {"role": "user", "content": "third question"},
    ]
    text = tokenizer.apply_chat_template(expected, tokenize=False, add_generation_prompt=True)
    first_count = history[5]["prompt_tokens"]
    assert first_count == len(tokenizer(text, add_special_tokens=False).input_ids)
    # With more turns allowed, the same question carries the first exchange too.
    at.slider(key="history_turns").set_value(5).run()
    at.button(key="regenerate").click().run()
    assert _history(at)[5]["prompt_tokens"] > first_count


def test_thinking_switch_shows_reasoning_apart_from_the_answer(thinking_server):
    at = _app(thinking_server.base)
    at.number_input(key="max_tokens").set_value(40)
    at.toggle(key="thinking").set_value(True).run()
    _send(at, THINK_QUESTION)
    answer = _history(at)[-1]
    assert answer["reasoning"].strip() == THINK_REASONING
    assert answer["content"].strip() == THINK_ANSWER
    bubble = at.chat_message[-1]
    assert [e.label for e in bubble.expander] == ["Thinking"]
    assert bubble.expander[0].markdown[0].value.strip() == THINK_REASONING
    assert [m.value.strip() for m in bubble.markdown if m.value.strip() == THINK_ANSWER]


def test_wrong_key_busy_server_and_stopped_server_give_readable_errors(models, tmp_path):
    """401, 429 and a server that went away: each one a sentence on the page, never a traceback.

    `--max-queue 0` leaves no waiting place, so the server refuses every completion with 429 (queue_full)
    while /v1/models still answers: a busy server, deterministically, with one server start.
    """
    live = LiveServer(models["random"], tmp_path / "serve.log", "--api-key", "secret", "--max-queue", "0")
    try:
        at = _app(live.base, key="wrong")
        assert at.error and "refused the key (401)" in at.error[0].value
        assert not at.exception
        at = _app(live.base, key="secret")
        assert not at.error
        _send(at, "are you there?")
        busy = _history(at)[-1]
        assert busy["content"] == "" and "busy (429" in busy["error"]
        assert any("busy (429" in e.value for e in at.error)
    finally:
        live.stop()
    _send(at, "and now?")
    failed = _history(at)[-1]
    assert failed["content"] == "" and "Cannot reach the API at " + live.base in failed["error"]
    assert any("Cannot reach the API" in e.value for e in at.error)
    # The failed exchanges stay on the page, each with its own error.
    assert [m["role"] for m in _history(at)] == ["user", "assistant"] * 2
    assert not at.exception


def test_model_box_follows_a_server_started_after_the_page_and_a_key_fixed_after_a_401(models, tmp_path):
    """The Model box fills in as soon as /v1/models answers, with no reload; the API's problem is said once."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1"
    at = _app(base, key="wrong")
    assert at.selectbox(key="model").value is None
    _send(at, "anyone there?")  # sent while the server is down: the sentence shows once, in the answer
    assert [e.value for e in at.error if "Cannot reach the API" in e.value] == [_history(at)[-1]["error"]]

    live = LiveServer(models["random"], tmp_path / "serve.log", "--api-key", "secret", port=port)
    try:
        at.run()
        assert at.selectbox(key="model").value is None  # up now, but the key is wrong: 401, said once
        assert len([e for e in at.error if "refused the key (401)" in e.value]) == 1
        at.text_input(key="api_key").set_value("secret").run()
        assert at.selectbox(key="model").value == "tiny-random"
        assert [e.value for e in at.error] == [_history(at)[1]["error"]]  # only the old exchange's own error
        _send(at, "now?")
        answer = _history(at)[-1]
        assert answer["content"] and not answer.get("error")
    finally:
        live.stop()


def _metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _send_and_stop(at, text: str, stop: Callable) -> dict:
    """Send `text` and, once the answer has started to stream, call `stop(runner, tree_so_far)` from another
    thread: what a click does while the script is still running. Returns what the page showed then."""
    from streamlit.testing.v1 import local_script_runner
    from streamlit.testing.v1.element_tree import parse_tree_from_messages

    runners: list = []
    original = local_script_runner.LocalScriptRunner.run
    seen: dict = {}
    finished = threading.Event()

    def recording_run(self, *args, **kwargs):
        runners.append(self)
        return original(self, *args, **kwargs)

    def watch() -> None:
        while not finished.is_set():
            if runners:
                tree = parse_tree_from_messages(list(runners[0].forward_msgs()))
                if any(m.value.endswith("▌") for m in tree.markdown):
                    tree._runner = at  # widget values are read through the AppTest, as AppTest itself does
                    seen["buttons"] = [b.key for b in tree.button]
                    stop(runners[0], tree)
                    return
            time.sleep(0.01)

    local_script_runner.LocalScriptRunner.run = recording_run
    watcher = threading.Thread(target=watch)
    try:
        watcher.start()
        _send(at, text)
    finally:
        finished.set()
        watcher.join()
        local_script_runner.LocalScriptRunner.run = original
    assert "buttons" in seen, "the answer never started streaming"
    return seen


def _click_stop(runner, tree) -> None:
    """The page's Stop button clicked mid-stream: a rerun request carrying the click, as the browser sends it."""
    from streamlit.runtime.scriptrunner import RerunData

    tree.button(key="stop").click()
    runner.request_rerun(RerunData(widget_states=tree.get_widget_states()))


def _toolbar_stop(runner, tree) -> None:
    """Streamlit's own Stop (top right while a script runs)."""
    runner.request_stop()


@pytest.mark.parametrize("stop", [_click_stop, _toolbar_stop], ids=["page-stop-button", "streamlit-stop"])
def test_stop_keeps_the_partial_answer_and_the_next_question_gets_its_own(server, stop):
    tokenizer = _tokenizer()
    at = _app(server.base)
    _send(at, "first question")
    at.number_input(key="max_tokens").set_value(400).run()  # long enough to be stopped midway
    aborted = _metric(server.base, 'minimind:request_success_total{finished_reason="abort"')
    seen = _send_and_stop(at, "second question", stop)
    # while the second answer streamed, the first one no longer offered Regenerate; Stop was there
    assert "stop" in seen["buttons"] and "regenerate" not in seen["buttons"]

    at.run()
    history = _history(at)
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    stopped = history[-1]
    assert stopped["stopped"] and stopped["content"] and not stopped.get("error")
    assert any("stopped" in c.value for c in at.chat_message[-1].caption)
    assert at.chat_message[-1].markdown[0].value.strip() == stopped["content"].strip()
    deadline = time.monotonic() + 60  # the closed stream aborts the generation on the server
    while _metric(server.base, 'minimind:request_success_total{finished_reason="abort"') == aborted:
        assert time.monotonic() < deadline, "the server never saw the stream closed"
        time.sleep(0.2)

    at.number_input(key="max_tokens").set_value(12).run()
    _send(at, "third question")
    history = _history(at)
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    answer = history[-1]
    assert answer["content"] and not answer.get("stopped") and not answer.get("error")
    # the server saw the stopped answer as the answer to its question, then the new question
    sent = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": history[1]["content"]},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": stopped["content"]},
        {"role": "user", "content": "third question"},
    ]
    text = tokenizer.apply_chat_template(sent, tokenize=False, add_generation_prompt=True)
    assert answer["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)


def test_page_has_no_deploy_button_and_clear_chat_comes_first(server):
    """Streamlit's toolbar shows Deploy unless toolbarMode says otherwise: .streamlit/config.toml does, for
    `streamlit run webui/app.py` from the repository root (AppTest does not draw the toolbar, so the setting
    is read as Streamlit reads it there)."""
    probe = "from streamlit import config; print(config.get_option('client.toolbarMode'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "minimal"
    at = _app(server.base)
    assert at.sidebar.button[0].label == "Clear chat"
    _send(at, "hello")
    at.sidebar.button[0].click().run()
    assert _history(at) == [] and not at.chat_message
