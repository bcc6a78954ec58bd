"""`minimind serve` (placeholder until the server lands)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model path (default: the embedded SmolLM2-135M-Instruct)")


def run(args: argparse.Namespace) -> int:
    print("minimind serve: the server is not built yet")
    return 1
