"""`minimind eval mc|ppl|chat|toolcall|vlm`: multiple-choice accuracy, perplexity, a canned-prompt smoke
test, tool calling and exact-match answers about pictures, on a checkpoint in this process (--model) or an
OpenAI-compatible server (--api-base)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
examples:
  minimind eval mc --model runs/sft/final --data ceval/val --shots 5 --json results.json
  minimind eval ppl --model runs/pretrain/final --data data/demo/pretrain.jsonl --window 512 --stride 256
  minimind eval ppl --model runs/pretrain/final --data held_out.txt --quantization int8   # vs. --dtype bf16
  minimind eval chat --model runs/sft/final --stage sft
  minimind eval toolcall --model runs/agent/final --data toolcall.jsonl --json toolcall-results.json
  minimind eval vlm --model runs/vlm-demo/final --data data/vlm-demo/test.jsonl
  OPENAI_API_KEY=KEY minimind eval mc --api-base http://127.0.0.1:8000 --data arc_easy.jsonl
"""

# Canned prompts per training stage: a pretrained model continues text, an SFT model answers.
CHAT_PROMPTS = {
    "pretrain": ["The capital of France is", "Once upon a time,", "中国的首都是", "人工智能是"],
    "sft": [
        "你好，请介绍一下你自己。",
        "What is 12 + 7?",
        "Give me three tips for staying healthy.",
        "解释一下什么是光合作用。",
    ],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="task", required=True)
    mc = sub.add_parser("mc", help="multiple-choice accuracy by log-likelihood (C-Eval, CMMLU, ARC, MMLU shapes)")
    _model_arguments(mc)
    mc.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="PATH",
        help='JSONL ({"question", "choices": [...], "answer": "A"}) or C-Eval CSV (question,A,B,C,D,answer) files, '
        'or directories of them; one subject per file (or per row\'s "subject"); repeatable',
    )
    mc.add_argument("--shots", type=int, default=0, help="answered examples shown first, per subject (default: 0)")
    mc.add_argument("--json", metavar="FILE", help="also write the full result (per subject, per question) as JSON")
    ppl = sub.add_parser("ppl", help='perplexity on a JSONL ("text" field) or plain text file')
    _model_arguments(ppl)
    ppl.add_argument("--data", required=True, metavar="FILE", help='a .jsonl file of {"text": ...} or a text file')
    ppl.add_argument("--window", type=int, default=512, help="tokens per scored window (default: 512)")
    ppl.add_argument("--stride", type=int, default=256, help="tokens the window advances by (default: 256)")
    ppl.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    chat = sub.add_parser("chat", help="greedy answers to canned prompts per stage, printed (a quick smoke test)")
    _model_arguments(chat)
    chat.add_argument(
        "--stage",
        choices=["pretrain", "sft", "all"],
        default="all",
        help="pretrain: plain continuations; sft: chat answers; all: both (default)",
    )
    chat.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    toolcall = sub.add_parser(
        "toolcall", help="tool calling: fraction of correct calls and of correct final answers (docs/eval.md)"
    )
    _model_arguments(toolcall)
    toolcall.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='JSONL cases {"messages", "tools", "expected_call", "tool_result", "answer"} (docs/eval.md)',
    )
    toolcall.add_argument("--max-tokens", type=int, default=128, help="tokens per model turn (default: 128)")
    toolcall.add_argument("--json", metavar="FILE", help="also write the result (per case: calls, reply) as JSON")
    vlm = sub.add_parser(
        "vlm", help="exact-match accuracy of a MiniMind-V's answers to questions about pictures (per kind)"
    )
    _model_arguments(vlm)
    vlm.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='vlm-* JSONL: {"image": "a.png", "conversations": [user, assistant], "kind": "colour"}, e.g. the '
        "test.jsonl of `minimind data vlm-demo`",
    )
    vlm.add_argument("--image-dir", metavar="DIR", help="folder the rows' image names are in (default: the file's)")
    vlm.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default: 16)")
    vlm.add_argument("--json", metavar="FILE", help="also write the result (every answer) as JSON")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint to evaluate in this process (anything `minimind convert` reads)")
    parser.add_argument(
        "--api-base", metavar="URL", help="an OpenAI-compatible server instead (key from OPENAI_API_KEY)"
    )
    parser.add_argument("--api-model", help="model name on the server (default: its first model)")
    parser.add_argument("--tokenizer", help="tokenizer directory when it is not beside --model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight precision (default: fp32 on CPU)")
    parser.add_argument(
        "--quantization",
        choices=["none", "int8", "int4"],
        default="none",
        help="CPU, with --model: int8/int4 weight-only linear layers as `minimind serve --quantization` runs them "
        "(compare with a --dtype bf16 run for the quality cost; default: none)",
    )


def run(args: argparse.Namespace) -> int:
    from evaluation.backends import open_model

    cases = None
    if args.task == "toolcall":  # a bad case file fails before a model is loaded
        from evaluation.toolcall import read_cases

        cases = read_cases(Path(args.data).expanduser())
    model = open_model(
        args.model,
        args.api_base,
        api_model=args.api_model,
        device=args.device,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        quantization=args.quantization,
    )
    if args.task == "chat":
        stages = ["pretrain", "sft"] if args.stage == "all" else [args.stage]
        for stage in stages:
            for prompt in CHAT_PROMPTS[stage]:
                answer = model.complete(prompt, args.max_tokens, chat=stage == "sft")
                print(f"[{stage}] {prompt}\n{answer.strip()}\n")
        return 0
    if args.task == "vlm":
        from evaluation.vlm import evaluate_vlm, read_image_questions

        image_dir = Path(args.image_dir).expanduser() if args.image_dir else None
        result = evaluate_vlm(model, read_image_questions(Path(args.data).expanduser(), image_dir), args.max_tokens)
        for kind, entry in result["kinds"].items():
            print(f"{kind}\t{entry['accuracy']:.4f}\t({entry['questions']} questions)")
        print(f"overall\t{result['accuracy']:.4f}\t({result['questions']} questions)")
    elif args.task == "mc":
        from evaluation.mc import evaluate_mc, read_questions

        result = evaluate_mc(model, read_questions([Path(p).expanduser() for p in args.data]), args.shots)
        for subject, entry in sorted(result["subjects"].items()):
            accuracy = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
            print(f"{subject}\t{accuracy}\t({entry['questions']} questions)")
        print(f"overall\t{result['accuracy']:.4f}\t({result['questions']} questions, {args.shots}-shot)")
    elif args.task == "toolcall":
        from evaluation.toolcall import evaluate_toolcall

        result = evaluate_toolcall(model, cases, args.max_tokens)
        for key in ("call_accuracy", "answer_accuracy"):
            value = "n/a" if result[key] is None else f"{result[key]:.4f}"
            print(f"{key}\t{value}")
        print(f"cases\t{result['cases']}")
    else:
        from evaluation.ppl import evaluate_ppl, read_documents

        result = evaluate_ppl(model, read_documents(Path(args.data).expanduser()), args.window, args.stride)
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens ({result['documents']} documents)")
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
