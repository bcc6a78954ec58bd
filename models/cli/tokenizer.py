"""`minimind tokenizer train --data FILE.jsonl --vocab-size 6400 --out DIR`."""

from __future__ import annotations

import argparse

EPILOG = """\
The data is JSONL: {"text": "..."} lines (pretraining) and/or {"conversations": [{"role": "user",
"content": "..."}, ...]} lines (SFT); both can be mixed in one file.

example:
  minimind tokenizer train --data pretrain_hq.jsonl --vocab-size 6400 --out ./my-tokenizer
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer from a JSONL file",
        description="Train a byte-level BPE tokenizer with MiniMind's special tokens and ChatML chat template.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--data", required=True, metavar="FILE.jsonl", help="training text, one JSON object per line")
    train.add_argument(
        "--vocab-size", type=int, default=6400, help="total tokens including the special ones (default 6400)"
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="directory to write tokenizer.json and tokenizer_config.json into"
    )
    train.add_argument("--force", action="store_true", help="write into DIR even if it already holds a tokenizer")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.tokenizer import TokenizerDataError, save_tokenizer, train_tokenizer

    out = Path(args.out)
    if (out / "tokenizer.json").exists() and not args.force:
        raise TokenizerDataError(f"{out}: already holds a tokenizer; choose another --out or pass --force")
    tokenizer = train_tokenizer(args.data, args.vocab_size)
    save_tokenizer(tokenizer, out)
    print(f"wrote {out} ({len(tokenizer)} tokens)")
    return 0
