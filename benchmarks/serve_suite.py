"""Both backends side by side: the client test suite and the load benchmark against `minimind serve`.

    PYTHONPATH=. python3 benchmarks/serve_suite.py --out DIR --tokenizer TOKDIR [--backends native vllm]

For each model (random weights in a preset's shape, converted with `minimind convert --to llama|qwen3`) and
each backend: start `minimind serve`, run the client suite (tests/test_server.py, test_server_errors.py,
test_server_load.py with MINIMIND_TEST_BASE_URL pointing at it), run benchmarks/bench_serve.py's concurrency
sweep, stop the server with SIGTERM. Everything lands in DIR: summary.json (pass counts, timings, device,
date), serve-<backend>.json per sweep, suite-<backend>.txt and server-<backend>.log (tails). The summary is
rewritten after every step, so a run cut short still reports what it finished. Made for one GPU call (the
first vLLM start compiles for about 150 s); on a CPU it runs the same way with smaller settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402

API_KEY = "suite-key"
SUITE = ["tests/test_server.py", "tests/test_server_errors.py", "tests/test_server_load.py"]
LOG_TAIL_BYTES = 200_000


def make_model(preset: str, to: str, tokenizer: Path, work: Path) -> Path:
    """Random weights in `preset`'s shape, saved as a minimind directory, then `minimind convert --to <to>`."""
    src, out = work / f"{preset}-minimind", work / f"{preset}-{to}"
    if not (out / "config.json").exists():
        code = (
            "import sys, torch; from models.model import MiniMindForCausalLM; from models.presets import preset_config;"
            "torch.manual_seed(0); MiniMindForCausalLM(preset_config(sys.argv[1])).save_pretrained(sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, preset, str(src)], check=True, cwd=ROOT)
        cmd = [
            sys.executable,
            "-m",
            "minimind",
            "convert",
            str(src),
            str(out),
            "--to",
            to,
            "--tokenizer",
            str(tokenizer),
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out


class Server:
    """`minimind serve` in a subprocess, with the flags the client suite expects (key, CORS origin)."""

    started = 0

    def __init__(self, model: Path, backend: str, name: str, args: argparse.Namespace, log: Path) -> None:
        Server.started += 1
        self.port = 8900 + Server.started
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "minimind", "serve", "--model", str(model), "--backend", backend]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--api-key", API_KEY, "--served-model-name", name]
        cmd += ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs)]
        cmd += ["--max-queue", "2048", "--cors-origins", "http://ui.example", "--drain-timeout", "10"]
        if args.device:
            cmd += ["--device", args.device]
        if args.compile and backend == "native":
            cmd += ["--compile"]
        self.handle = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.handle, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout:.0f}s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.handle.close()
        data = self.log.read_bytes()
        if len(data) > LOG_TAIL_BYTES:
            self.log.write_bytes(b"[... cut ...]\n" + data[-LOG_TAIL_BYTES:])
        return self.proc.returncode


def run_suite(url: str, out: Path, timeout: float) -> dict:
    """The client suite against `url`; returns pytest's counts (passed / failed / skipped / errors)."""
    env = dict(os.environ, MINIMIND_TEST_BASE_URL=url, MINIMIND_TEST_API_KEY=API_KEY, PYTHONPATH=_pythonpath())
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=", *SUITE]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        text, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        text, code = f"{err.stdout or ''}\n[suite timed out after {timeout:.0f}s]", -1
    out.write_text(text[-LOG_TAIL_BYTES:])
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    lines = text.strip().splitlines()
    summary = lines[-1] if lines else ""
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary):
        counts[word.rstrip("s") if word.startswith("error") else word] += int(number)
    not_passed = [line[:300] for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    return {
        **counts,
        "exit_code": code,
        "seconds": round(time.monotonic() - started, 1),
        "summary_line": summary,
        "not_passed": not_passed,
    }


def run_bench(url: str, label: str, out: Path, args: argparse.Namespace, timeout: float) -> dict:
    cmd = [sys.executable, "benchmarks/bench_serve.py", "--base-url", url, "--api-key", API_KEY, "--label", label]
    cmd += ["--concurrency", *map(str, args.concurrency), "--output-len", str(args.output_len), "--out", str(out)]
    if args.num_prompts:
        cmd += ["--num-prompts", str(args.num_prompts)]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
    except subprocess.TimeoutExpired:
        return {"error": f"benchmark timed out after {timeout:.0f}s"}
    if not out.exists():
        return {"error": f"benchmark wrote nothing (exit {done.returncode})", "stderr": done.stderr[-1000:]}
    levels = json.loads(out.read_text())["levels"]
    return {
        "seconds": round(time.monotonic() - started, 1),
        "levels": [
            {
                "concurrency": lv["concurrency"],
                "completed": lv["completed"],
                "failed": lv["failed"],
                "output_tok_s": round(lv["output_throughput_tok_s"], 1),
                "ttft_median_ms": round(lv["ttft"]["median_ms"], 2),
                "tpot_median_ms": round(lv["tpot"]["median_ms"], 3),
                "itl_median_ms": round(lv["itl"]["median_ms"], 3),
            }
            for lv in levels
        ],
    }


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for summary.json, sweeps, logs")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory for the random models")
    parser.add_argument("--work", type=Path, default=Path("/tmp/minimind-serve-suite"), help="models go here")
    parser.add_argument("--backends", nargs="+", default=["native", "vllm"], choices=["native", "vllm"])
    parser.add_argument("--models", nargs="+", default=["minimind2-small:llama"], help="PRESET:TO; first is benched")
    parser.add_argument("--device", help="--device for the native backend (default: cuda when available)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--num-prompts", type=int, help="requests per level (default: bench_serve's)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="start the native backend with --compile")
    parser.add_argument("--skip-suite", action="store_true", help="only the load benchmark (no client suite)")
    parser.add_argument("--budget", type=float, default=510, help="seconds; later models are skipped past 60%% of it")
    args = parser.parse_args(argv)

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "benchmark": "serve-suite",
        **provenance(__file__),
        "suite": [] if args.skip_suite else SUITE,
        "native_compile": args.compile,
        "runs": [],
    }

    def save() -> None:
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    for position, spec in enumerate(args.models):
        preset, to = spec.split(":")
        if position > 0 and time.monotonic() - started > 0.6 * args.budget:
            summary["runs"].append({"model": spec, "skipped": "time budget"})
            save()
            continue
        model = make_model(preset, to, args.tokenizer, args.work)
        for backend in args.backends:
            # the first model's files come back in --out; later ones stay in --work (8 files come back at most)
            where, tag = (args.out, backend) if position == 0 else (args.work, f"{backend}-{preset}-{to}")
            run: dict = {"model": f"{preset} (random weights) as {to}", "backend": backend}
            summary["runs"].append(run)
            server = Server(model, backend, preset, args, where / f"server-{tag}.log")

            def left(most: float) -> float:  # each step gets at most what the budget still holds
                return max(30.0, min(most, args.budget - (time.monotonic() - started)))

            try:
                run["startup_s"] = round(server.wait_healthy(left(400)), 1)
                save()
                if not args.skip_suite:
                    run["suite"] = run_suite(server.url, where / f"suite-{tag}.txt", timeout=left(300))
                    save()
                if position == 0:
                    bench_out = args.out / f"serve-{tag}.json"
                    run["bench"] = run_bench(server.url, backend, bench_out, args, timeout=left(300))
            except Exception as err:  # record and go on to the next backend
                run["error"] = f"{type(err).__name__}: {err}"
                run["server_log_tail"] = server.log.read_text(errors="replace")[-3000:]
            finally:
                run["exit_code"] = server.stop()
                save()
            print(json.dumps(run), flush=True)
    save()
    failed = [r for r in summary["runs"] if r.get("error") or r.get("suite", {}).get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
