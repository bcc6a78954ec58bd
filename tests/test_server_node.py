"""The official OpenAI Node SDK (npm `openai`) against the live server: one non-stream and one stream call.

`npm install` puts the SDK into tests/node/node_modules (git-ignored) the first time.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import ROOT
from tests.test_server_support import API_KEY, MODEL_NAME, main_server

NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def node_sdk() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed: the Node SDK check needs Node.js >= 18")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"npm install failed:\n{done.stderr[-2000:]}"
    return node


def test_node_sdk_stream_and_non_stream(node_sdk):
    server = main_server()
    done = subprocess.run(
        [node_sdk, "check.mjs", server.base_url, API_KEY, MODEL_NAME],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["id"].startswith("chatcmpl-") and isinstance(seen["content"], str)
    assert seen["finish"] == "length" and seen["usage"]["completion_tokens"] == 5
    assert seen["stream_role"] == "assistant" and seen["stream_finish"] == "length"
    assert seen["stream_usage"]["completion_tokens"] == 5
