"""What third-party clients expect beyond the OpenAI routes: vLLM's /tokenizer_info, X-Request-Id, the
temperature rule, a useful 400 for a non-JSON body, and a busy port refused before the model loads."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import ROOT
from tests.test_server_support import main_server, needs_own_server, tiny_model_dir


@pytest.fixture(scope="module")
def server():
    return main_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none", max_retries=0, timeout=120)


def test_tokenizer_info_describes_the_served_tokenizer(server):
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()  # open, like /tokenize
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == (
        tokenizer.eos_token,
        tokenizer.bos_token,
        tokenizer.pad_token,
    )
    assert info["chat_template"] == tokenizer.chat_template
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert not {"vocab_file", "merges_file", "name_or_path"} & set(info)  # no paths of the server's disk


def test_lm_eval_detects_the_remote_tokenizer(server):
    """lm-eval's own probe (used by local-completions when no tokenizer is given) accepts this server."""
    utils = pytest.importorskip("lm_eval.utils", reason="lm-eval is in the dev extra")
    assert utils.check_remote_tokenizer_support(server.base_url + "/completions")
    remote = utils.RemoteTokenizer(server.base_url + "/completions")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    assert remote.eos_token_id == tokenizer.eos_token_id
    assert remote.encode("hello world") == tokenizer("hello world", add_special_tokens=False)["input_ids"]


def test_x_request_id_is_echoed_or_made(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    mine = httpx.get(server.base_url + "/models", headers={**headers, "X-Request-Id": "trace-42"}, timeout=30)
    assert mine.headers["x-request-id"] == "trace-42"
    made = [httpx.get(server.base_url + "/models", headers=headers, timeout=30).headers["x-request-id"] for _ in "ab"]
    assert made[0] != made[1] and all(len(value) == 32 for value in made)
    refused = httpx.get(server.base_url + "/models", headers={"X-Request-Id": "trace-43"}, timeout=30)
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "trace-43"  # errors carry it too


@pytest.mark.parametrize("temperature, ok", [(0.0, True), (2.0, True), (2.01, False), (-0.1, False)])
def test_temperature_outside_0_to_2_is_400(client, server, temperature, ok):
    kwargs = dict(model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    if ok:
        assert client.chat.completions.create(temperature=temperature, **kwargs).choices
        return
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(temperature=temperature, **kwargs)
    assert err.value.body["param"] == "temperature" and "between 0 and 2" in err.value.body["message"]


def test_a_form_body_gets_a_400_that_says_to_send_json(server):
    """curl -d sends application/x-www-form-urlencoded: the message names the header to send."""
    bare = httpx.post(server.url + "/tokenize", content=b'{"prompt": "hello"}', timeout=30)  # no Content-Type
    assert bare.status_code == 400 and "Content-Type: application/json" in bare.json()["error"]["message"]
    response = httpx.post(
        server.url + "/tokenize",
        content=b'{"prompt": "hello"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "Content-Type: application/json" in message and "application/x-www-form-urlencoded" in message


def test_serve_on_a_busy_port_fails_at_once_naming_the_port(tmp_path):
    """The port is taken before the model loads: a model path that does not exist is never looked at."""
    needs_own_server("starts a server of its own")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "minimind", "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--model", str(tmp_path / "no-such-model")]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: port ") and str(port) in lines[0], out.stderr
    assert "--port" in lines[0] and "serving" not in out.stderr and "no-such-model" not in out.stderr
