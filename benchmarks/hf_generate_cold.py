"""Why HF `generate` on a GPU can be 7x slower in one measurement than in the next: first run vs repeat.

Each case runs in a fresh process: a random model of a preset shape, saved as our MiniMind directory and converted
to transformers' own class (`minimind convert --to auto`), then HF greedy `generate` of `--new-tokens` after a
16-token prompt, three times in a row (the first run meets every sequence length for the first time). Cases: our
MiniMind class and transformers' own class, each with PyTorch's default attention backends and with the cuDNN
attention backend turned off (`torch.backends.cuda.enable_cudnn_sdp(False)`). Our class leaves cuDNN out of
incremental decoding by itself (models/model.py), so its two rows should agree.

    python benchmarks/hf_generate_cold.py --preset minimind2-small --out benchmarks/results/hf-generate-cold.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402


def one_case(preset: str, model_class: str, cudnn: bool, new_tokens: int, tokenizer: str) -> dict:
    """Runs in the child process: three timed generate calls, tok/s each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.config import MiniMindConfig
    from models.convert import convert
    from models.model import MiniMindForCausalLM
    from models.presets import PRESETS

    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**{**PRESETS[preset], "max_position_embeddings": 4096}))
    scratch = Path(tempfile.mkdtemp())
    model.save_pretrained(scratch / "minimind")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(scratch / "minimind")
    if model_class == "transformers":
        exported, _ = convert(scratch / "minimind", scratch / "hf", "auto")
        model = AutoModelForCausalLM.from_pretrained(exported)
    model = model.to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(10, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).cuda()
    runs = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        runs.append(round(new_tokens / (time.perf_counter() - start), 1))
    return {"class": type(model).__name__, "cudnn_sdp": cudnn, "tok_s_runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", default=[])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/upstream-minimind/minimind2-dense"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child process: preset,class,cudnn
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.case:
        preset, model_class, cudnn = args.case.split(",")
        print(json.dumps(one_case(preset, model_class, cudnn == "1", args.new_tokens, args.tokenizer)))
        return 0
    results = {**provenance(__file__), "new_tokens": args.new_tokens, "dtype": "bfloat16", "rows": []}
    for preset in args.preset or ["minimind2-small"]:
        for model_class in ("minimind", "transformers"):
            for cudnn in ("1", "0"):
                case = f"{preset},{model_class},{cudnn}"
                cmd = [sys.executable, __file__, "--case", case, "--new-tokens", str(args.new_tokens)]
                out = subprocess.run(cmd + ["--tokenizer", args.tokenizer], capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                row = (
                    {"preset": preset, **json.loads(lines[-1])} if lines else {"case": case, "error": out.stderr[-800:]}
                )
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # after every case: a later failure keeps what was measured
                    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
