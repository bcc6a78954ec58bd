"""Live servers for the server tests: `minimind serve` in a subprocess on 127.0.0.1 with a tiny random model.

The model is tests/conftest.py's tiny MiniMind saved next to the real minimind3 tokenizer (chat template
included), so every request goes through the real CLI, app, NativeBackend and tokenizer. Servers are started
once per test session (per configuration) and stopped at exit.

Client suite against any running server: with MINIMIND_TEST_BASE_URL=http://HOST:PORT (and
MINIMIND_TEST_API_KEY=KEY if it needs one) the SDK, error and load tests run against that server instead
(e.g. `--backend vllm` on a GPU); the model name and context length are read from the server itself, and the
tests that need a server of their own (429 queue, SIGTERM, scripted model) are skipped.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, UPSTREAM_FIXTURES, tiny_model

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256


EXTERNAL_URL = os.environ.get("MINIMIND_TEST_BASE_URL", "").strip().rstrip("/").removesuffix("/v1")


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen | None  # None: a server this test session did not start (MINIMIND_TEST_BASE_URL)
    log: Path | None
    model: str = MODEL_NAME
    api_key: str = API_KEY
    max_model_len: int = MAX_MODEL_LEN

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def external(self) -> bool:
        return self.proc is None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log else "(external server: no log here)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None:
            raise RuntimeError("an external server is not stopped by the tests")
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_tmp = tempfile.TemporaryDirectory(prefix="minimind-server-tests-")
_servers: dict[tuple[str, ...], LiveServer] = {}


def tiny_model_dir(name: str = "tiny-minimind", **config: int) -> Path:
    """A tiny random MiniMind with the real minimind3 tokenizer, saved once as a Hugging Face directory
    (`config` overrides tests/conftest.py's tiny_config, e.g. a longer max_position_embeddings)."""
    path = Path(_tmp.name) / name
    if not path.is_dir():
        # Built in a scratch directory and renamed when complete: a failure half-way never leaves a directory
        # that a later test would take for a finished model.
        from transformers import AutoTokenizer

        scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_tmp.name))
        tiny_model(**config).save_pretrained(scratch)
        AutoTokenizer.from_pretrained(UPSTREAM_FIXTURES / "minimind3-dense").save_pretrained(scratch)
        scratch.rename(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def external_server() -> LiveServer:
    """The server at MINIMIND_TEST_BASE_URL, described by its own /v1/models and /tokenize answers."""
    if "external" not in _external:
        key = os.environ.get("MINIMIND_TEST_API_KEY", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        models = httpx.get(EXTERNAL_URL + "/v1/models", headers=headers, timeout=30).json()["data"]
        limit = httpx.post(EXTERNAL_URL + "/tokenize", json={"prompt": "x"}, timeout=30).json()["max_model_len"]
        _external["external"] = LiveServer(EXTERNAL_URL, None, None, models[0]["id"], key, limit)
    return _external["external"]


_external: dict[str, LiveServer] = {}


def needs_own_server(what: str) -> None:
    """Skip a test that must start (or stop) a server of its own when the suite targets an external one."""
    if EXTERNAL_URL:
        pytest.skip(f"{what}: needs a server started by the test (MINIMIND_TEST_BASE_URL is set)")


def start_server(*extra: str, fresh: bool = False, timeout: float = 180, model: Path | None = None) -> LiveServer:
    """`minimind serve` on a free port with the tiny model (or `model`); reused for the same arguments unless fresh."""
    needs_own_server("a server with its own flags")
    model = model or tiny_model_dir()
    key = (str(model), *extra)
    if not fresh and key in _servers and _servers[key].proc.poll() is None:
        return _servers[key]
    port = free_port()
    log = Path(_tmp.name) / f"server-{port}.log"
    cmd = [sys.executable, "-m", "minimind", "serve", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--served-model-name", MODEL_NAME, "--max-model-len", str(MAX_MODEL_LEN)]
    cmd += ["--device", "cpu", "--log-level", "warning", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"server did not become healthy in {timeout}s:\n{server.log_tail()}")
        time.sleep(0.3)
    if not fresh:
        _servers[key] = server
    atexit.register(server.stop, signal.SIGKILL, 10)
    return server


# Process layouts the client suite runs against: the engine stepped in the API process (the CPU default), and
# the engine in a process of its own behind one or four API processes (the GPU default; --api-server-count).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "in-process": (),
    "api-1": ("--engine-process",),
    "api-4": ("--api-server-count", "4"),
}


def layout_flags(layout: str) -> tuple[str, ...]:
    """The flags of a layout; skips a test of a layout other than the first against an external server."""
    if EXTERNAL_URL and layout != "in-process":
        pytest.skip(f"layout {layout}: the external server has its own")
    return LAYOUTS[layout]


def main_server(layout: str = "in-process") -> LiveServer:
    """The server most tests share: API key, CORS for one origin, room for 64 concurrent streams."""
    flags = layout_flags(layout)
    if EXTERNAL_URL:
        return external_server()
    return start_server(
        "--api-key",
        API_KEY,
        "--max-num-seqs",
        "16",
        "--max-queue",
        "256",
        "--cors-origins",
        "http://ui.example",
        *flags,
    )


LONG_CONTEXT = 16384


def long_context_model_dir() -> Path:
    """The tiny model with room for long streams (tests that must keep a stream running for seconds)."""
    return tiny_model_dir("tiny-minimind-long", max_position_embeddings=LONG_CONTEXT)


def tight_server(layout: str = "in-process") -> LiveServer:
    """One batch slot and one queue place, so a third concurrent request is refused (429)."""
    return start_server("--max-num-seqs", "1", "--max-queue", "1", *layout_flags(layout))


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples from /metrics: all label sets, or those carrying every one of `labels`
    (e.g. kind="prefill")."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total, found = 0.0, False
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise AssertionError(f"metric {name} not in /metrics:\n{text[:2000]}")
    return total
