"""`minimind serve` against `vllm serve`, measured by vLLM's own load client, on the same exported model.

    python benchmarks/bench_vllm_serve.py --vllm "python3 /path/to/vllm_cli.py" --shapes minimind2-small minimind2 \
        --concurrency 1 16 64 256 --minimind-args "--compile --api-server-count 4"

For each shape: a MiniMind of that preset with random weights (seeded) and the minimind2 tokenizer is written and
exported with `minimind convert --to llama`, so both servers load the very same plain Llama directory. Then, one
server at a time on the same port: start it, wait for /health, run `vllm bench serve` (random dataset, 128 input
and 128 output tokens, --ignore-eos) at every concurrency, stop it. `--vllm` is the command that runs vLLM's CLI
(`vllm`, or `python3 vllm_cli.py` where vLLM is installed without console scripts); the script never looks for
it anywhere else.

Each level also records `server_cores`: every server process's CPU over the level, in cores, busiest first (Linux
/proc). A process near 1.0 (one busy Python thread) is what limits that level; none near it points at the client.
(The engine process of `minimind serve` polls without sleeping while it has work: it shows near 1.0 regardless.)
Minimind levels and the offline run record `engine_steps`, the engine's prefill and decode steps (from /metrics):
the same requests in more, smaller prefill steps through the server than offline show how arrivals split them.

`--client-ceiling 1 2` first measures the client itself: the highest level against benchmarks/null_server.py, a
server that does no work, at 1 and at 2 tokens per SSE event. A server whose figure nears that ceiling is measured
by the client's limit, not its own; `--stream-interval 2` (both servers accept it) halves the events per token.

`--minimind-args` given more than once runs `minimind serve` once per value (variants, e.g. with and without
`--stream-interval 2`), each labelled by its flags in the table and the plot; `--offline` takes the engine flags of
the first.

Results: one JSON (every run, each level in bench_serve.py's shape, vLLM's raw result kept beside) and one PNG
per shape (throughput, TTFT and TPOT against concurrency, one line per server), plus a table of the ratios.

`--offline` adds, per shape and after the servers, the same workload through the native engine with no server
(engine/llm.py `LLM.generate` over as many random prompts as the highest level sends, the engine flags of
`--minimind-args`, sampled as the client's requests are: at the server's default temperature for `vllm bench
serve`, greedy for the builtin client): the output tok/s a server could deliver at most, and each minimind level's
share of it.

Without vLLM (a CPU machine, to check this script): `--client builtin --servers minimind` measures with
benchmarks/bench_serve.py's client instead, e.g.
    python benchmarks/bench_vllm_serve.py --client builtin --servers minimind --shapes minimind2-small \
        --concurrency 1 4 --num-prompts 8 --input-len 32 --output-len 16 --minimind-args "--device cpu"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_serve  # noqa: E402
from benchmarks.null_server import NullServer  # noqa: E402
from benchmarks.plots import plot_serve  # noqa: E402
from benchmarks.provenance import machine_name, provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TOKENIZER = ROOT / "tests" / "fixtures" / "upstream-minimind" / "minimind2-dense"
SERVED_NAME = "m"
FIRST_PROMPT = "The quick brown fox jumps over the lazy dog because"


def export_model(shape: str, folder: Path) -> Path:
    """A seeded random MiniMind of `shape`, saved with the minimind2 tokenizer and exported as a Llama directory."""
    llama = folder / f"{shape}-llama"
    if llama.is_dir():
        return llama
    import torch
    from transformers import AutoTokenizer

    from models.config import MiniMindConfig
    from models.model import MiniMindForCausalLM
    from models.presets import PRESETS

    torch.manual_seed(0)
    source = folder / f"{shape}-minimind"
    model = MiniMindForCausalLM(MiniMindConfig(**{**PRESETS[shape], "max_position_embeddings": 4096}))
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(source)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{shape}: {params:.1f}M parameters, exporting to {llama}", flush=True)
    run([sys.executable, "-m", "minimind", "convert", "--to", "llama", str(source), str(llama)])
    return llama


def run(cmd: list[str], **kwargs) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def server_command(server: str, model: Path, args: argparse.Namespace, extra: str) -> list[str]:
    """The command line of one server run; `extra` is one of --minimind-args, or --vllm-args."""
    common = ["--port", str(args.port), "--served-model-name", SERVED_NAME]
    if server == "minimind":
        cmd = [sys.executable, "-m", "minimind", "serve", "--model", str(model), "--host", "127.0.0.1", *common]
        return cmd + ["--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"] + shlex.split(extra)
    cmd = [*shlex.split(args.vllm), "serve", str(model), *common, "--max-num-seqs", str(args.max_num_seqs)]
    return cmd + shlex.split(extra)


class Server:
    """A server subprocess in its own session (so that stopping it stops its children too), logged to a file."""

    def __init__(self, cmd: list[str], log: Path, url: str) -> None:
        self.url, self.log = url, log
        print("starting:", shlex.join(cmd), flush=True)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float, poll_s: float = 0.5) -> float:
        """Seconds until /health first answers 200, polled every `poll_s`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout:g}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def client_level(args: argparse.Namespace, model: Path, concurrency: int, folder: Path, name: str) -> dict:
    """One level through the chosen client."""
    if args.client == "vllm":
        return vllm_level(args, model, concurrency, folder, name)
    return builtin_level(args, concurrency)


def vllm_level(args: argparse.Namespace, model: Path, concurrency: int, folder: Path, name: str) -> dict:
    """One `vllm bench serve` run; its result JSON mapped onto bench_serve.py's level shape (raw kept)."""
    num_prompts = args.num_prompts or max(4 * concurrency, 32)
    result_file = f"{name}-c{concurrency}.json"
    cmd = [*shlex.split(args.vllm), "bench", "serve", "--backend", "openai", "--base-url", server_url(args)]
    cmd += ["--model", SERVED_NAME, "--tokenizer", str(model), "--dataset-name", "random"]
    cmd += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len), "--ignore-eos"]
    cmd += ["--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--seed", "0"]
    cmd += ["--percentile-metrics", "ttft,tpot,itl,e2el"]
    cmd += ["--save-result", "--save-detailed", "--result-dir", str(folder), "--result-filename", result_file]
    run(cmd)
    raw = json.loads((folder / result_file).read_text())
    # --save-detailed adds per-request lists: keep each request's TTFT (in send order, so a slow first request or a
    # periodic stall shows), drop the bulky ones (every inter-token gap, the generated texts)
    for bulky in ("itls", "generated_texts", "input_lens", "output_lens", "errors", "start_times"):
        raw.pop(bulky, None)

    def stats(metric: str) -> dict[str, float]:
        return {f"{k}_ms": float(raw.get(f"{k}_{metric}_ms", 0.0)) for k in ("mean", "median", "p99", "std")}

    return {
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "completed": raw.get("completed"),
        "failed": num_prompts - int(raw.get("completed", 0)),
        "duration_s": raw.get("duration"),
        "total_input_tokens": raw.get("total_input_tokens"),
        "total_output_tokens": raw.get("total_output_tokens"),
        "request_throughput_rps": raw.get("request_throughput"),
        "output_throughput_tok_s": raw.get("output_throughput"),
        "ttft": stats("ttft"),
        "tpot": stats("tpot"),
        "itl": stats("itl"),
        "e2el": stats("e2el"),
        "ttft_per_request_ms": [round(t * 1e3, 2) for t in raw.pop("ttfts", [])],
        "vllm_bench_serve": raw,
    }


def builtin_level(args: argparse.Namespace, concurrency: int) -> dict:
    """The same level through benchmarks/bench_serve.py's client (where vLLM is not installed)."""
    options = bench_serve.parse_args(["--base-url", server_url(args)])
    options.input_len, options.output_len = args.input_len, args.output_len
    options.num_prompts = args.num_prompts or max(4 * concurrency, 32)
    return asyncio.run(bench_serve.run_level(options, SERVED_NAME, concurrency))


def server_url(args: argparse.Namespace) -> str:
    return f"http://127.0.0.1:{args.port}"


def bench_server(
    server: str, shape: str, model: Path, args: argparse.Namespace, folder: Path, variant: int = 0
) -> dict:
    """One server run (start, first requests, every level, stop); `variant` picks the --minimind-args entry."""
    extra = args.minimind_args[variant] if server == "minimind" else args.vllm_args
    name = f"{shape}-{server}" + (f"-{variant}" if variant else "")
    command = server_command(server, model, args, extra)
    process = Server(command, folder / f"{name}.log", server_url(args))
    try:
        startup = process.wait_healthy(args.start_timeout, poll_s=0.05)
        print(f"{server} ({shape}) healthy after {startup:.1f}s", flush=True)
        first = first_requests(server_url(args), args.first_requests)
        levels = []
        for concurrency in args.concurrency:
            cpu_before = session_cpu_seconds(process.proc.pid)
            steps_before = engine_steps(server_url(args)) if server == "minimind" else {}
            level = client_level(args, model, concurrency, folder, name)
            level["server_cores"] = cores_used(cpu_before, session_cpu_seconds(process.proc.pid), level["duration_s"])
            if steps_before:
                steps_after = engine_steps(server_url(args))
                level["engine_steps"] = {kind: int(steps_after[kind] - steps_before[kind]) for kind in steps_after}
            levels.append(level)
            print(
                f"{server:>8} {shape:>16} c={concurrency:<4} output {level['output_throughput_tok_s']:.1f} tok/s, "
                f"TTFT median {level['ttft']['median_ms']:.1f} ms p99 {level['ttft']['p99_ms']:.1f} ms, "
                f"TPOT median {level['tpot']['median_ms']:.2f} ms, server processes' cores {level['server_cores']}"
                + (f", engine steps {level['engine_steps']}" if "engine_steps" in level else ""),
                flush=True,
            )
    finally:
        process.stop()
    run = {
        "backend": server,
        "model": shape,
        "command": shlex.join(command),
        "startup_s": startup,
        "first_requests_ttft_ms": first,
        "levels": levels,
    }
    if server == "minimind" and len(args.minimind_args) > 1:
        run["label"] = f"minimind {extra}".strip()  # tells the variants apart in the table and the plot
    return run


def client_ceiling(args: argparse.Namespace, model: Path, folder: Path) -> list[dict]:
    """The client against benchmarks/null_server.py at the highest concurrency, once per --client-ceiling value
    (tokens per event): the output tok/s the client itself tops out at on this machine."""
    concurrency = max(args.concurrency)
    levels = []
    for tokens_per_event in args.client_ceiling:
        with NullServer(args.port, tokens_per_event):
            level = client_level(args, model, concurrency, folder, f"null-server-{tokens_per_event}")
        level["tokens_per_event"] = tokens_per_event
        levels.append(level)
        print(
            f"client ceiling c={concurrency} at {tokens_per_event} token(s) per event: "
            f"{level['output_throughput_tok_s']:.1f} tok/s",
            flush=True,
        )
    return levels


def session_cpu_seconds(session: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of each live process of a session, by pid: the server and every process
    it started (API processes, the engine, vLLM's workers). Linux /proc; an empty dict elsewhere."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[3]) == session:
            seconds[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def cores_used(before: dict[int, float], after: dict[int, float], duration_s: float | None) -> list[float]:
    """Each server process's CPU over a level, in cores (CPU seconds / the level's duration), busiest first, idle
    ones left out. A process near 1.0 is the bottleneck (one Python thread); none near it points at the client.
    The client's own start-up (imports) falls outside the server's processes, so it does not blur this."""
    if not duration_s:
        return []
    used = ((after[pid] - before.get(pid, 0.0)) / duration_s for pid in after)
    return sorted((round(c, 2) for c in used if c >= 0.05), reverse=True)


def engine_steps(url: str) -> dict[str, float]:
    """The native engine's steps so far by kind (prefill, decode), from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    steps = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if family.name == "minimind:engine_steps":
            steps.update((s.labels["kind"], s.value) for s in family.samples if s.name.endswith("_total"))
    return steps


def first_requests(url: str, count: int) -> list[float]:
    """TTFT (ms) of the first `count` requests after /health turned 200, before any load: one after another, each
    on a new connection (so several API processes each get theirs), a short greedy completion of 8 tokens. `vllm
    bench serve` leaves its own first request (a test run) out of its figures; these say what a user's first
    message meets."""
    bench_serve.warm_client(url)
    ttfts = [round(bench_serve.first_token_ms(url, SERVED_NAME, FIRST_PROMPT, 8), 2) for _ in range(count)]
    if ttfts:
        print(f"first {count} requests after start: TTFT {ttfts} ms", flush=True)
    return ttfts


def bench_offline(shape: str, model: Path, args: argparse.Namespace) -> dict:
    """The highest level's workload through `LLM.generate` in this process (after one small warm-up call), with the
    engine flags of --minimind-args; `share_of_offline` is then added to each minimind level."""
    import random

    from engine.cli.args import add_model_arguments, engine_config_from_args
    from engine.llm import LLM

    flags = argparse.ArgumentParser()
    add_model_arguments(flags)
    engine_args, _ = flags.parse_known_args(shlex.split(args.minimind_args[0]))  # serve-only flags are left out
    engine_args.model, engine_args.max_num_seqs = str(model), args.max_num_seqs
    llm = LLM(config=engine_config_from_args(engine_args))
    concurrency = max(args.concurrency)
    num_prompts = args.num_prompts or max(4 * concurrency, 32)
    rng = random.Random(0)
    vocab = llm.model.config.vocab_size
    prompts = [[rng.randrange(10, vocab) for _ in range(args.input_len)] for _ in range(num_prompts)]
    params = offline_params(args)
    llm.generate(prompts[: min(8, num_prompts)], params)
    before = llm.engine.stats()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    after = llm.engine.stats()
    steps = {"prefill": after.prefill_steps - before.prefill_steps, "decode": after.decode_steps - before.decode_steps}
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f" offline {shape:>16} {num_prompts} requests: output {tokens / seconds:.1f} tok/s, steps {steps}", flush=True
    )
    del llm
    return {
        "backend": "offline engine",
        "model": shape,
        "command": f"engine.llm.LLM.generate, engine flags {shlex.join(shlex.split(args.minimind_args[0]))!r}",
        "num_prompts": num_prompts,
        "output_tokens": tokens,
        "duration_s": seconds,
        "output_throughput_tok_s": tokens / seconds,
        "engine_steps": steps,
        "temperature": params.temperature,
    }


def offline_params(args: argparse.Namespace):
    """The sampling of the requests the client sends, so that the offline run does the same work: `vllm bench
    serve` leaves temperature out, and the server samples at its default (1.0, no seed); bench_serve.py asks for
    greedy (0). Each request: `--output-len` tokens, EOS ignored."""
    from engine.sampling_params import SamplingParams

    temperature = 0.0 if args.client == "builtin" else SamplingParams().temperature
    return SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=temperature, detokenize=True)


def offline_shares(runs: list[dict]) -> None:
    """Each minimind level's output tok/s as a share of the offline engine's on the same shape."""
    offline = {r["model"]: r["output_throughput_tok_s"] for r in runs if r["backend"] == "offline engine"}
    for run in runs:
        if run["backend"] == "minimind" and run["model"] in offline:
            for level in run["levels"]:
                level["share_of_offline"] = level["output_throughput_tok_s"] / offline[run["model"]]


def ratio_table(runs: list[dict]) -> list[str]:
    """minimind / vllm output throughput per shape and concurrency (one block per minimind variant), then each
    minimind level's share of the offline engine."""
    lines = []
    for shape in dict.fromkeys(r["model"] for r in runs):
        theirs = next((r for r in runs if r["model"] == shape and r["backend"] == "vllm"), None)
        for ours in (r for r in runs if r["model"] == shape and r["backend"] == "minimind"):
            if theirs is None:
                break
            for mine, other in zip(ours["levels"], theirs["levels"]):
                a, b = mine["output_throughput_tok_s"], other["output_throughput_tok_s"]
                lines.append(
                    f"{shape:>16} c={mine['concurrency']:<4} {ours.get('label', 'minimind')} {a:>10.1f} tok/s  "
                    f"vllm {b:>10.1f} tok/s  ratio {a / b if b else float('nan'):.2f}x"
                )
    for run in runs:
        for level in run["levels"] if run["backend"] == "minimind" else []:
            if "share_of_offline" in level:
                lines.append(
                    f"{run['model']:>16} c={level['concurrency']:<4} {run.get('label', 'minimind')} "
                    f"{level['output_throughput_tok_s']:>10.1f} tok/s = {level['share_of_offline']:.0%} of the "
                    "offline engine"
                )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", default="vllm", help="command that runs vLLM's CLI, e.g. 'python3 vllm_cli.py'")
    parser.add_argument("--servers", nargs="+", default=["minimind", "vllm"], choices=["minimind", "vllm"])
    parser.add_argument("--shapes", nargs="+", default=["minimind2-small", "minimind2"], help="models/presets.py names")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--num-prompts", type=int, help="requests per level (default: 4 x concurrency, at least 32)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (random dataset)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (--ignore-eos)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="both servers' batch size limit")
    parser.add_argument(
        "--minimind-args",
        action="append",
        help="extra `minimind serve` flags, e.g. '--compile'; given again, each is a run of its own (variants)",
    )
    parser.add_argument(
        "--vllm-args",
        default="--dtype bfloat16 --gpu-memory-utilization 0.35",
        help="extra `vllm serve` flags (bf16 as `minimind serve` on a GPU; a share of the one GPU)",
    )
    parser.add_argument("--client", choices=["vllm", "builtin"], default="vllm", help="load client (see above)")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument(
        "--first-requests", type=int, default=4, help="requests timed right after start-up, each on a new connection"
    )
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to be healthy")
    parser.add_argument("--workdir", type=Path, help="exported models and raw results (default: a temp folder)")
    parser.add_argument("--machine", help="machine description to record (default: detected GPU/CPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/vllm-bench-serve-<date>.json)")
    parser.add_argument("--offline", action="store_true", help="also the same workload through the engine alone")
    parser.add_argument(
        "--client-ceiling",
        type=int,
        nargs="*",
        default=[],
        metavar="TOKENS_PER_EVENT",
        help="first, the client against a server that does no work (benchmarks/null_server.py) at the highest "
        "concurrency, once per value given (tokens per SSE event, as --stream-interval sends them)",
    )
    args = parser.parse_args(argv)
    args.minimind_args = args.minimind_args or [""]
    if any(n < 1 for n in args.client_ceiling):
        parser.error(f"--client-ceiling values are tokens per event, 1 or more; got {args.client_ceiling}")
    if args.first_requests < 0:
        parser.error(
            f"--first-requests must be 0 or more (0 leaves the first requests untimed), got {args.first_requests}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minimind-vllm-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    ceiling: list[dict] = []
    for shape in args.shapes:
        model = export_model(shape, folder)
        if args.client_ceiling and not ceiling:
            ceiling = client_ceiling(args, model, folder)
        for server in args.servers:
            variants = range(len(args.minimind_args)) if server == "minimind" else [0]
            runs.extend(bench_server(server, shape, model, args, folder, variant) for variant in variants)
        if args.offline:
            runs.append(bench_offline(shape, model, args))
    offline_shares(runs)
    report = {
        "benchmark": "vllm-bench-serve",
        **provenance(__file__),
        "machine": args.machine or machine_name(),
        "client": "vllm bench serve" if args.client == "vllm" else "benchmarks/bench_serve.py",
        "dataset": {"name": "random", "input_len": args.input_len, "output_len": args.output_len, "ignore_eos": True},
        "runs": runs,
    }
    if ceiling:
        report["client_ceiling"] = ceiling
    out = args.out or RESULTS / f"vllm-bench-serve-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")
    for shape in args.shapes:
        records = [(str(out), {**run, "machine": report["machine"], "date": report.get("date")}) for run in runs]
        records = [r for r in records if r[1]["model"] == shape and "levels" in r[1]]  # servers, not the offline run
        try:
            png = out.with_name(f"{out.stem}-{shape}.png")
            plot_serve(records, png)
            print(f"drew {png}")
        except ImportError:
            print("no PNG: matplotlib is not installed (pip install 'my-minimind[bench]')")
    for line in ratio_table(runs):
        print(line)
    failed = sum(level["failed"] or 0 for run in runs for level in run.get("levels", []))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
