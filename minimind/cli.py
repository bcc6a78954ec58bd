"""`minimind`: one command, subcommands imported only when used, so `minimind --help` answers at once.

Each subcommand lives in its own module with two functions:
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("models.cli.convert", "convert a checkpoint (.pth, HF dir, .gguf) into a Hugging Face directory"),
    "tokenizer": ("models.cli.tokenizer", "train a byte-level BPE tokenizer with MiniMind's special tokens"),
    "generate": ("engine.cli.generate", "generate a completion for one prompt"),
    "chat": ("engine.cli.chat", "chat with a model in the terminal"),
    "serve": ("server.cli", "serve a model through an OpenAI-compatible HTTP API"),
    "train": ("training.cli", "train a model: pretrain, sft, lora, dpo, distill, grpo, ... (one config per stage)"),
    "plot": ("training.plot", "draw a training run's metrics (loss, lr, grad norm, tokens/s) as a PNG"),
    "data": ("training.data_cli", "build datasets (e.g. the offline demo sets)"),
    "vlm-demo": ("webui.vlm_demo", "Gradio page: chat about images with a MiniMind-V model over the API"),
    "eval": ("evaluation.cli", "evaluate a model: multiple choice, perplexity, canned prompts, tool calling"),
}


def _top_level_help() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: minimind <command> [options]",
        "",
        "Train, convert and serve small LLMs (MiniMind and small Llama/Qwen models).",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "Run `minimind <command> --help` for a command's options; `minimind --version` prints the version."]
    return "\n".join(lines)


def version() -> str:
    """The installed package's version (pyproject.toml's), or a note when running from an uninstalled checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("my-minimind")
    except PackageNotFoundError:
        return "unknown (not installed: run `pip install -e .`)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"minimind {version()}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"minimind: unknown command {name!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module_name, summary = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"minimind {name}", description=summary, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from minimind.errors import MiniMindError

    try:
        return int(module.run(args) or 0)
    except MiniMindError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
