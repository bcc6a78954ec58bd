"""The chat page: `streamlit run webui/app.py`, talking to `minimind serve` (or any OpenAI-compatible API).

The page only draws; what it sends and how it reads the stream live in `webui/chat_logic.py`. Every
exchange is kept in `st.session_state.history`, so a rerun (any widget change) redraws the same chat.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import openai
import streamlit as st

# `streamlit run webui/app.py` puts webui/ (not the project root) on sys.path; this makes `webui.` importable
# from a source checkout as well as from an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from webui.chat_logic import (  # noqa: E402
    DEFAULT_MAX_TOKENS,
    StreamAccumulator,
    api_settings_from_env,
    build_messages,
    completion_request,
    friendly_error,
)

MODELS_TTL_S = 30


@st.cache_data(ttl=MODELS_TTL_S, show_spinner=False)
def list_models(api_base: str, api_key: str) -> list[str]:
    """Model ids from /v1/models. Errors are raised, not cached, so a server that comes up is seen at once."""
    return [model.id for model in make_client(api_base, api_key).models.list().data]


def make_client(api_base: str, api_key: str) -> openai.OpenAI:
    # No retries: a person waiting on the page should see "server down" or "busy" at once, not after backoff.
    return openai.OpenAI(base_url=api_base, api_key=api_key, max_retries=0, timeout=openai.Timeout(300.0, connect=5.0))


def sidebar() -> dict[str, Any]:
    """The settings panel; returns the values the next request uses."""
    env_base, env_key = api_settings_from_env()
    with st.sidebar:
        st.button("Clear chat", on_click=clear_chat, icon=":material/delete:", width="stretch")
        st.header("Settings")
        api_base = st.text_input("API base URL", value=env_base, key="api_base", help="Ends with /v1.")
        api_key = st.text_input("API key", value=env_key, key="api_key", type="password")
        models: list[str] = []
        models_error = None
        try:
            models = list_models(api_base, api_key)
        except Exception as exc:  # any failure becomes a sentence on the page, never a traceback
            models_error = friendly_error(exc, api_base)
        # A model list that arrives later (server started after the page, key fixed after a 401) replaces the
        # empty or stale choice: the widget keeps its old value otherwise.
        if models and st.session_state.get("model") not in models:
            st.session_state["model"] = models[0]
        model = st.selectbox("Model", models, key="model", help="Filled from the server's /v1/models.")
        system_prompt = st.text_area("System prompt", value="", key="system_prompt", height=80)
        temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="temperature")
        top_p = st.slider("Top p", 0.05, 1.0, 0.95, 0.05, key="top_p")
        max_tokens = st.number_input(
            "Max tokens",
            1,
            32768,
            DEFAULT_MAX_TOKENS,
            64,
            key="max_tokens",
            help="Longest answer, in tokens. A request without max_tokens may run to the end of the model's "
            "context window, so the page always sends one.",
        )
        history_turns = st.slider(
            "Past turns sent", 0, 20, 4, key="history_turns", help="How many earlier exchanges go with a message."
        )
        thinking = st.toggle("Thinking", value=False, key="thinking", help="Let the model reason before answering.")
    return {
        "api_base": api_base,
        "api_key": api_key,
        "model": model,
        "models_error": models_error,
        "system_prompt": system_prompt,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_tokens": int(max_tokens),
        "history_turns": int(history_turns),
        "thinking": bool(thinking),
    }


def clear_chat() -> None:
    st.session_state.history = []


def regenerate() -> None:
    """Drops the last answer and its question, and asks that question again on this rerun."""
    history = st.session_state.history
    if history and history[-1]["role"] == "assistant":
        history.pop()
    if history and history[-1]["role"] == "user":
        st.session_state.pending_prompt = history.pop()["content"]


def draw_answer(message: dict[str, Any], *, last: bool) -> None:
    """One assistant bubble's contents: reasoning (collapsed), answer, stats, copy, regenerate, error.

    `last`: the newest answer, and no other one streaming: only it offers Regenerate."""
    if message.get("reasoning"):
        with st.expander("Thinking", expanded=False):
            st.markdown(message["reasoning"])
    if message["content"]:
        st.markdown(message["content"])
    if message.get("error"):
        st.error(message["error"])
    footer = st.columns([5, 2, 2])
    if message.get("stats"):
        footer[0].caption(message["stats"])
    if message["content"]:
        with footer[1].popover("Copy", icon=":material/content_copy:", help="The answer as plain text, to copy"):
            st.code(message["content"], language=None, wrap_lines=True)
    if last:
        footer[2].button("Regenerate", key="regenerate", on_click=regenerate, icon=":material/refresh:")


def stream_answer(settings: dict[str, Any], prompt: str, history: list[dict[str, Any]], acc: StreamAccumulator) -> dict:
    """Sends one request and draws the answer as it streams; returns the assistant entry for the history.

    Stop (the button under the answer, or Streamlit's own) ends this run at the next drawing call; the
    `with` closes the stream, so the server stops generating, and the caller keeps what arrived.
    """
    if not settings["model"]:
        message = acc.to_message()
        message["error"] = settings["models_error"] or f"The API at {settings['api_base']} lists no model to ask."
        return message
    reasoning_box, answer_box = st.empty(), st.empty()
    st.button("Stop", key="stop", icon=":material/stop_circle:", help="Stop the answer; the part received is kept")
    try:
        messages = build_messages(settings["system_prompt"], history, prompt, settings["history_turns"])
        request = completion_request(
            model=settings["model"],
            messages=messages,
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            max_tokens=settings["max_tokens"],
            thinking=settings["thinking"],
        )
        with make_client(settings["api_base"], settings["api_key"]).chat.completions.create(**request) as stream:
            for chunk in stream:
                reasoning_delta, content_delta = acc.feed(chunk)
                if reasoning_delta:
                    with reasoning_box.container():
                        with st.expander("Thinking", expanded=True):
                            st.markdown(acc.reasoning)
                if content_delta:
                    answer_box.markdown(acc.content + "▌")
    except Exception as exc:  # server down, 401, 429, dropped stream: a sentence, and the partial answer kept
        message = acc.to_message()
        message["error"] = friendly_error(exc, settings["api_base"])
        return message
    return acc.to_message()


def main() -> None:
    st.set_page_config(page_title="MiniMind chat", page_icon="💬", layout="centered")
    st.session_state.setdefault("history", [])
    settings = sidebar()
    st.title("MiniMind chat")
    history: list[dict[str, Any]] = st.session_state.history
    typed = st.chat_input("Message")  # drawn at the bottom wherever it is called; read first to know if busy
    prompt = st.session_state.pop("pending_prompt", None) or typed

    # The API's problem is said once: here, unless the last answer already says the same.
    banner = settings["models_error"]
    if banner and not (history and history[-1].get("error") == banner):
        st.error(banner)
    elif settings["model"]:
        st.caption(f"Model: {settings['model']} · {settings['api_base']}")

    for i, message in enumerate(history):
        with st.chat_message(message["role"]):
            if message["role"] == "user":
                st.markdown(message["content"])
            else:
                draw_answer(message, last=i == len(history) - 1 and not prompt)

    if not prompt:
        return
    earlier = list(history)
    history.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    acc = StreamAccumulator()
    answer = None
    try:
        with st.chat_message("assistant"):
            answer = stream_answer(settings, prompt, earlier, acc)
    finally:
        # A Stop ends the run inside stream_answer (Streamlit raises there): the question is still answered,
        # with the part that arrived, marked as stopped, so the next message is not taken for its answer.
        history.append(answer if answer is not None else acc.to_message(stopped=True))
    st.rerun()  # redraw from history, so the new answer gets its footer (copy, regenerate) like the others


main()
