"""`minimind generate`: complete one prompt (or answer it as a chat turn) and print the result.

With one completion the text streams to stdout as it is generated; a summary line (finish reason, token
count, speed) goes to stderr so stdout stays just the text. `--json` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine.cli.args import (
    add_model_arguments,
    add_sampling_arguments,
    add_thinking_arguments,
    chat_template_kwargs_from_args,
    engine_config_from_args,
    sampling_params_from_args,
)
from engine.errors import InvalidRequestError

EXAMPLES = """examples:
  minimind generate --prompt "Once upon a time" --max-tokens 64
  minimind generate --model out/sft --chat --prompt "What is 2+2?" --temperature 0
  echo "Translate to French: cheese" | minimind generate --chat --prompt - --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument(
        "--prompt", required=True, help='the text to complete; "-" reads it from standard input (e.g. a file)'
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="treat the prompt as a user message and format it with the model's chat template",
    )
    parser.add_argument("--system", default=None, help="system message for --chat (default: the template's own)")
    add_thinking_arguments(parser)
    parser.add_argument("-n", type=int, default=1, help="number of different completions to generate (default: 1)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token ids, finish reason, reasoning for --chat) instead of plain text",
    )
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_tokens=256)


def read_prompt(value: str) -> str:
    if value != "-":
        return value
    text = sys.stdin.read()
    if not text.strip():
        raise InvalidRequestError("--prompt - read nothing from standard input", param="prompt")
    return text


def build_prompt(args: argparse.Namespace, text: str) -> str | list[dict[str, str]]:
    """The plain prompt, or the chat messages for --chat."""
    if not args.chat:
        if args.system is not None or args.thinking is not None:
            raise InvalidRequestError("--system, --thinking and --no-thinking need --chat", param="chat")
        return text
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    return messages + [{"role": "user", "content": text}]


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args, n=args.n)
    prompt = build_prompt(args, read_prompt(args.prompt))
    template_kwargs = chat_template_kwargs_from_args(args)

    from engine.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    if args.json or args.n > 1:
        return print_outputs(llm, args, prompt, params, template_kwargs)
    return stream_output(llm, prompt, params, template_kwargs)


def stream_output(llm, prompt, params, template_kwargs) -> int:
    start = time.perf_counter()
    last = None
    for delta in llm.stream(prompt, params, chat_template_kwargs=template_kwargs):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        last = delta
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    if last is not None:
        speed = last.num_generated_tokens / elapsed if elapsed > 0 else 0.0
        print(
            f"[{last.finish_reason}: {last.num_generated_tokens} tokens, prompt {last.num_prompt_tokens} tokens, "
            f"{speed:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def print_outputs(llm, args, prompt, params, template_kwargs) -> int:
    from engine.reasoning import reasoning_opened_by_prompt, split_reasoning

    if args.chat:
        result = llm.chat(prompt, params, chat_template_kwargs=template_kwargs)[0]
        opened = reasoning_opened_by_prompt(llm.apply_chat_template(prompt, template_kwargs))
    else:
        result = llm.generate(prompt, params)[0]
    completions = []
    for out in result.outputs:
        item = {
            "index": out.index,
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "stop_reason": out.stop_reason,
        }
        if args.chat:
            item["reasoning"], item["content"] = split_reasoning(out.text, opened=opened)
        completions.append(item)
    if args.json:
        payload = {"prompt_token_ids": result.prompt_token_ids, "completions": completions}
        print(json.dumps(payload, ensure_ascii=False))
        return 0
    for item in completions:
        print(f"--- completion {item['index']} ({item['finish_reason']}) ---")
        print(item["text"])
    return 0
