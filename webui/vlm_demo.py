"""Gradio page: a multi-turn chat about uploaded images with a MiniMind-V model, through the OpenAI API.

`minimind vlm-demo --api-base URL` talks to a running `minimind serve`; `--model PATH` starts one as a
subprocess first (the web UI speaks only HTTP). With neither (and no MINIMIND_API_BASE) it serves the offline demo
model that configs/vlm-demo.yaml trains into runs/vlm-demo/final, or says how to make it. Also
`python webui/vlm_demo.py [same flags]`.
Images go to the server as data URLs in OpenAI `image_url` parts, so every turn's images stay in the
conversation the model sees; answers stream.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai

if __package__ in (None, ""):  # `python webui/vlm_demo.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from webui.chat_logic import DEFAULT_API_BASE, DEFAULT_API_KEY, api_settings_from_env, friendly_error

DEFAULT_PORT = 7860  # Gradio's usual port, as the design card says
DEMO_MODEL = Path("runs/vlm-demo/final")  # configs/vlm-demo.yaml's output, relative to where it was run
MAKE_DEMO_MODEL = (
    f"no model given and no offline demo model at {DEMO_MODEL}; make it (a few minutes on CPU) with\n"
    "  minimind data vlm-demo data/vlm-demo\n"
    "  minimind train --config configs/vlm-demo.yaml\n"
    "or pass --model PATH (a MiniMind-V directory) or --api-base URL (a running minimind serve)"
)


def image_part(path: str | Path) -> dict[str, Any]:
    """An OpenAI image_url content part holding the file as a data URL."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _file_path(item: Any) -> str | None:
    """The file path in one of Gradio's shapes of a file message/part, or None when it is text."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], str):
        return item[0]
    if isinstance(item, dict):
        if isinstance(item.get("path"), str):
            return item["path"]
        if isinstance(item.get("file"), dict):
            return item["file"].get("path")
        if isinstance(item.get("file"), str):
            return item["file"]
    return None


def content_parts(content: Any) -> list[dict[str, Any]]:
    """A Gradio message content (text, a file, or a list of both) as OpenAI content parts."""
    items = content if isinstance(content, list) and not _file_path(content) else [content]
    parts = []
    for item in items:
        path = _file_path(item)
        if path is not None:
            parts.append(image_part(path))
        elif isinstance(item, dict) and item.get("type") == "text":
            parts.append({"type": "text", "text": item.get("text", "")})
        elif isinstance(item, str) and item:
            parts.append({"type": "text", "text": item})
    return parts


def openai_messages(message: dict[str, Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gradio's history (role/content messages) plus the new multimodal message, as OpenAI chat messages.
    Consecutive user entries (Gradio stores each upload as its own message) become one user message."""
    turns: list[dict[str, Any]] = []
    files = [f if isinstance(f, dict) else {"path": str(f)} for f in message.get("files", [])]
    new = [{"role": "user", "content": file} for file in files]
    new += [{"role": "user", "content": message.get("text", "")}]
    for entry in [*history, *new]:
        role = entry["role"]
        if role == "assistant":
            text = entry["content"] if isinstance(entry["content"], str) else ""
            if isinstance(entry["content"], list):
                text = "".join(p.get("text", "") for p in entry["content"] if isinstance(p, dict))
            turns.append({"role": "assistant", "content": text})
            continue
        parts = content_parts(entry["content"])
        if turns and turns[-1]["role"] == "user":
            turns[-1]["content"] += parts
        else:
            turns.append({"role": "user", "content": parts})
    return [t for t in turns if t["content"]]


def answer_stream(
    client: openai.OpenAI, model: str, messages: list[dict[str, Any]], temperature: float, top_p: float, max_tokens: int
) -> Iterator[str]:
    """The answer so far, after each streamed chunk; a client error becomes a sentence in the chat."""
    text = ""
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=temperature,
            top_p=top_p,
            max_tokens=int(max_tokens),
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                yield text
    except Exception as exc:  # noqa: BLE001 - shown to the person, who can fix the server or the image
        yield (text + "\n\n" if text else "") + f"⚠️ {friendly_error(exc, str(client.base_url))}"
        return
    if not text:
        yield "(empty answer)"


def build_demo(api_base: str, api_key: str) -> Any:
    import gradio as gr

    client = openai.OpenAI(base_url=api_base, api_key=api_key, max_retries=0)

    def respond(message: dict[str, Any], history: list[dict[str, Any]], temperature, top_p, max_tokens):
        try:
            model = client.models.list().data[0].id
        except Exception as exc:  # noqa: BLE001
            yield f"⚠️ {friendly_error(exc, api_base)}"
            return
        yield from answer_stream(client, model, openai_messages(message, history), temperature, top_p, max_tokens)

    return gr.ChatInterface(
        respond,
        multimodal=True,
        title="MiniMind-V",
        description=f"Upload images and ask about them; the conversation goes to {api_base}.",
        additional_inputs=[
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature"),
            gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top_p"),
            gr.Slider(1, 2048, value=256, step=1, label="max tokens"),
        ],
        api_name="chat",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`minimind serve --model MODEL` on a free local port; returns (process, its /v1 base URL)."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "minimind", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: `{' '.join(cmd)}` exited with {process.returncode} (see its messages above)")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"error: the server for {model} did not start within {timeout:.0f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        metavar="PATH",
        help=f"start `minimind serve` on this MiniMind-V model and use it (default: {DEMO_MODEL}, the offline demo "
        "model of configs/vlm-demo.yaml, unless --api-base or MINIMIND_API_BASE is given)",
    )
    source.add_argument(
        "--api-base",
        metavar="URL",
        help=f"OpenAI-compatible API to talk to (default: MINIMIND_API_BASE or {DEFAULT_API_BASE})",
    )
    parser.add_argument("--api-key", help=f"API key (default: MINIMIND_API_KEY or {DEFAULT_API_KEY!r})")
    parser.add_argument("--host", default="127.0.0.1", help="address of the page (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port of the page (default {DEFAULT_PORT})")


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the demo needs gradio: pip install 'my-minimind[webui]'", file=sys.stderr)
        return 1
    env_base, env_key = api_settings_from_env()
    server = None
    api_base = args.api_base or env_base
    model = args.model
    if not model and not args.api_base and not os.environ.get("MINIMIND_API_BASE", "").strip():
        if not (DEMO_MODEL / "config.json").is_file():
            print(f"error: {MAKE_DEMO_MODEL}", file=sys.stderr)
            return 1
        model = str(DEMO_MODEL)
    if model:
        server, api_base = start_server(model)
    try:
        build_demo(api_base, args.api_key or env_key).launch(server_name=args.host, server_port=args.port)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm_demo.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
