"""The Gradio MiniMind-V page: its message building, and a live page answering through gradio_client."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT
from tests.test_server_support import MODEL_NAME, free_port
from tests.test_server_vision import MEDIA, client, png, vision_server
from webui.vlm_demo import openai_messages


def test_history_with_images_becomes_openai_messages(tmp_path):
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red.write_bytes(png((255, 0, 0)))
    blue.write_bytes(png((0, 0, 255)))
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(red)}}]},
        {"role": "user", "content": [{"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    messages = openai_messages({"text": "and this one?", "files": [str(blue)]}, history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    first, answer, second = messages
    assert [p["type"] for p in first["content"]] == ["image_url", "text"]
    assert first["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert answer["content"] == "red"
    assert [p["type"] for p in second["content"]] == ["image_url", "text"]
    assert second["content"][0] != first["content"][0]  # the new image, not the old one again


@pytest.mark.slow
def test_the_page_answers_about_an_uploaded_image_like_the_api():
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    server = vision_server()
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1")
    demo = subprocess.Popen(
        [sys.executable, "-m", "minimind", "vlm-demo", "--api-base", server.base_url, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert demo.poll() is None, "the demo exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.5)
        MEDIA.mkdir(parents=True, exist_ok=True)
        image = MEDIA / "demo-red.png"
        image.write_bytes(png((255, 0, 0)))
        page = Client(f"http://127.0.0.1:{port}/", verbose=False)
        answer = page.predict(
            {"text": "What colour?", "files": [handle_file(str(image))]}, 0.0, 1.0, 8, api_name="/chat"
        )
        direct = client(server).chat.completions.create(
            model=MODEL_NAME,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image.as_uri()}},
                        {"type": "text", "text": "What colour?"},
                    ],
                }
            ],
            temperature=0,
            top_p=1.0,
            max_tokens=8,
        )
        text = answer if isinstance(answer, str) else str(answer)
        assert "⚠️" not in text and direct.choices[0].message.content
        assert direct.choices[0].message.content in text
    finally:
        demo.terminate()
        demo.wait(30)


def test_without_a_model_it_names_the_commands_that_make_the_demo_model(tmp_path):
    """No --model, no --api-base, no MINIMIND_API_BASE and nothing at runs/vlm-demo/final: exit 1 with the
    two commands (run where no demo model was trained: an empty folder)."""
    env = {k: v for k, v in os.environ.items() if k != "MINIMIND_API_BASE"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "minimind", "vlm-demo"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "minimind data vlm-demo data/vlm-demo" in done.stderr
    assert "minimind train --config configs/vlm-demo.yaml" in done.stderr
