"""Every `curl` line in docs/*.md runs against a live `minimind serve`, so the documented examples cannot rot.

The lines are taken from the Markdown itself (code blocks, with their `\\` continuations and multi-line
quoted JSON, and inline code spans), then run with curl as written, with only the address
(`http://localhost:8998`), the key (`secret`) and the model name (`SmolLM2-135M-Instruct`) replaced by the
test server's. A line that sends a key runs against the server with a key; one that does not, against an
open server (as the docs present them).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_server_support import main_server, needs_own_server, start_server

DOCS = sorted((ROOT / "docs").glob("*.md"))
DOC_ADDRESS = "http://localhost:8998"
DOC_KEY = "secret"
DOC_MODEL = "SmolLM2-135M-Instruct"
_FENCE = re.compile(r"^\s*```")
_INLINE = re.compile(r"`(curl [^`]+)`")


def _complete(command: str) -> bool:
    """A command is complete when it does not end in a continuation and its quotes are closed."""
    if command.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(command)
    except ValueError:  # an open quote: the JSON goes on on the next line
        return False
    return True


def curl_lines(path: Path) -> list[tuple[str, str]]:
    """(where, command) for each curl command in a Markdown file, continuation lines joined."""
    found: list[tuple[str, str]] = []
    in_code, pending, start = False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if _FENCE.match(line):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            found += [(f"{path.name}:{number}", match) for match in _INLINE.findall(line)]
            continue
        if not pending and not line.strip().startswith("curl "):
            continue
        if not pending:
            start = number
        pending = pending + "\n" + line if pending else line.strip()
        if _complete(pending):
            found.append((f"{path.name}:{start}", pending))
            pending = ""
    return found


EXAMPLES = [example for path in DOCS for example in curl_lines(path)]


def test_the_docs_have_curl_examples():
    """The extraction itself: the multi-line examples of docs/server.md are found whole."""
    commands = [command for _, command in EXAMPLES]
    assert len(EXAMPLES) >= 8
    streamed = next(c for c in commands if c.startswith("curl -N"))
    assert '"stream": true' in streamed and shlex.split(streamed)[-1].rstrip().endswith("}")


@pytest.mark.skipif(shutil.which("curl") is None, reason="the examples are curl commands; curl is not installed")
@pytest.mark.parametrize("where, command", EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_curl_example_runs(where, command):
    assert DOC_ADDRESS in command, f"{where}: a curl example should address {DOC_ADDRESS} (the default server)"
    keyed = "Authorization" in command
    if keyed:
        server = main_server()
    else:
        needs_own_server("an open server for the examples that send no key")
        # An example that sends its own chat template is documented for a server started with the trust flag.
        trusted = ["--trust-request-chat-template"] if '"chat_template"' in command else []
        server = start_server(*trusted)
    command = command.replace(DOC_ADDRESS, server.url).replace(f"Bearer {DOC_KEY}", f"Bearer {server.api_key}")
    args = shlex.split(command.replace("\\\n", " ").replace(DOC_MODEL, server.model))
    assert args[0] == "curl"
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body", "--max-time", "120", *args[1:]],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{where}: {command}\nexit {done.returncode}\n{done.stdout[-2000:]}{done.stderr}"
    assert done.stdout.strip(), f"{where}: empty answer"
