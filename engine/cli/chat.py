"""`minimind chat`: a terminal conversation with a model, streamed token by token.

The conversation is kept (the model sees the earlier turns) until `/clear`. A thinking model's reasoning is
shown dimmed, apart from the answer, and only the answer goes into the history (as chat templates expect).
Ctrl-C while the model writes stops that answer and keeps what it wrote; Ctrl-D, `/exit` or `/quit` leave.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.cli.args import (
    add_model_arguments,
    add_sampling_arguments,
    add_thinking_arguments,
    chat_template_kwargs_from_args,
    engine_config_from_args,
    sampling_params_from_args,
)

HELP = "commands: /clear forgets the conversation, /exit (or Ctrl-D) leaves, /help shows this"
EXAMPLES = """examples:
  minimind chat
  minimind chat --model out/sft --system "You are a terse assistant." --temperature 0.3
  minimind chat --model out/reason --no-thinking
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("--system", default=None, help="system message that starts every conversation")
    add_thinking_arguments(parser)
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_tokens=1024)


class Chat:
    """One conversation: history, system prompt, and the turn that streams an answer to a console."""

    def __init__(self, llm: Any, params: Any, system: str | None, template_kwargs: dict | None, console: Any) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.template_kwargs = template_kwargs
        self.console = console
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.history

    def clear(self) -> None:
        self.history = []

    def turn(self, user_text: str) -> str:
        """Stream the model's answer to `user_text`; returns the answer (reasoning excluded)."""
        from engine.reasoning import ReasoningStreamParser, reasoning_opened_by_prompt

        self.history.append({"role": "user", "content": user_text})
        messages = self.messages()
        opened = reasoning_opened_by_prompt(self.llm.apply_chat_template(messages, self.template_kwargs))
        parser = ReasoningStreamParser(opened=opened)
        answer: list[str] = []
        shown = {"reasoning": False}

        def show(reasoning: str, content: str) -> None:
            if reasoning:
                if not shown["reasoning"]:
                    self.console.print("thinking: ", style="dim italic", end="")
                    shown["reasoning"] = True
                self.console.print(reasoning, style="dim", end="")
            if content:
                if shown["reasoning"] and not answer:
                    self.console.print()
                answer.append(content)
                self.console.print(content, end="")

        try:
            for delta in self.llm.stream(messages, self.params, chat_template_kwargs=self.template_kwargs):
                show(*parser.feed(delta.text))
            show(*parser.flush())
        except KeyboardInterrupt:
            show(*parser.flush())
            self.console.print(" [stopped]", style="dim", end="")
        self.console.print()
        text = "".join(answer)
        self.history.append({"role": "assistant", "content": text})
        return text


def repl(chat: Chat, read_line: Any = input) -> int:
    """Read a line, answer it, repeat; handles the slash commands."""
    console = chat.console
    console.print(HELP, style="dim")
    while True:
        try:
            line = read_line(">>> ")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            chat.clear()
            console.print("(conversation cleared)", style="dim")
            continue
        if text == "/help":
            console.print(HELP, style="dim")
            continue
        if text.startswith("/") and " " not in text:
            console.print(f"unknown command {text}; {HELP}", style="dim")
            continue
        chat.turn(line)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    params = sampling_params_from_args(args)
    template_kwargs = chat_template_kwargs_from_args(args)
    console = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)

    from engine.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    chat = Chat(llm, params, args.system, template_kwargs, console)
    if not sys.stdin.isatty():
        return repl(chat, read_line=_read_piped_line)
    return repl(chat)


def _read_piped_line(prompt: str) -> str:
    """input() for a pipe: show the prompt and echo the line, so a transcript reads like a session."""
    sys.stdout.write(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    sys.stdout.write(line if line.endswith("\n") else line + "\n")
    sys.stdout.flush()
    return line.rstrip("\n")
