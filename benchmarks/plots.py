"""PNG figures beside the benchmark JSON, for people who look rather than read.

The benchmark scripts call these after saving their JSON; the command line draws records saved earlier:

    python benchmarks/plots.py engine benchmarks/results/engine-h200-2026-12-03.json
    python benchmarks/plots.py serve benchmarks/results/serve-native-h200-20261202.json \
        benchmarks/results/serve-vllm-h200-20261202.json --out benchmarks/results/serve-h200-20261202.png

A figure only redraws numbers from the JSON it names (in its title); it measures nothing itself.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# engine_<N>_out_tok_s / hf_<N>_out_tok_s: N requests at once; *_b1_tok_s: one request.
ENGINE_KEY = re.compile(r"^(engine|hf|vllm)_(b1|\d+)(?:_out)?_tok_s$")
IMPLEMENTATION = {"engine": "this engine", "hf": "transformers", "vllm": "vLLM"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def engine_series(record: dict) -> dict[str, list[tuple[int, float]]]:
    """'model, implementation' -> [(requests at once, output tok/s)] from a bench_engine.py record."""
    series: dict[str, list[tuple[int, float]]] = {}
    for model in record.get("models", []):
        for key, value in model.items():
            match = ENGINE_KEY.match(key)
            if match and isinstance(value, (int, float)):
                impl, batch = match.groups()
                label = f"{model['model']}, {IMPLEMENTATION[impl]}"
                series.setdefault(label, []).append((1 if batch == "b1" else int(batch), float(value)))
    return {label: sorted(points) for label, points in series.items()}


def plot_engine(record: dict, out: Path, source: str = "") -> dict[str, list[tuple[int, float]]]:
    """Decode throughput by number of requests at once, one line per model and implementation."""
    series = engine_series(record)
    if not series:
        raise ValueError(f"{source or 'record'}: no engine_*/hf_* tok/s figures to draw")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", ls="-" if "this engine" in label else "--", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("requests decoded at once")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(_title(record, source), fontsize=8)
    _save(fig, out)
    return series


def serve_series(record: dict) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(concurrency, value)] from a bench_serve.py record."""
    out: dict[str, list[tuple[int, float]]] = {"output tok/s": [], "median TTFT (ms)": [], "median TPOT (ms)": []}
    for level in record["levels"]:
        c = int(level["concurrency"])
        out["output tok/s"].append((c, float(level["output_throughput_tok_s"])))
        out["median TTFT (ms)"].append((c, float(level["ttft"]["median_ms"])))
        out["median TPOT (ms)"].append((c, float(level["tpot"]["median_ms"])))
    return out


def plot_serve(records: list[tuple[str, dict]], out: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Throughput, TTFT and TPOT by concurrency; one line per (source, record), labelled by backend and model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    drawn = {}
    for _source, record in records:
        label = f"{record.get('label') or record.get('backend', '?')} ({record.get('model', '?')})"
        drawn[label] = serve_series(record)
        for ax, (metric, points) in zip(axes, drawn[label].items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label)
            ax.set_title(metric, fontsize=10)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("; ".join(_title(record, source) for source, record in records), fontsize=7)
    _save(fig, out)
    return drawn


def plot_cpu_quant(record: dict, out: Path, source: str = "") -> dict[str, float]:
    """Batch-1 output tok/s per configuration of a bench_cpu_quant.py record, one bar each."""
    speeds = {name: entry["tok_s"] for name, entry in record.get("configs", {}).items() if "tok_s" in entry}
    if not speeds:
        raise ValueError(f"{source or 'record'}: no configs with tok_s to draw")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(speeds) + 1.4))
    names = list(speeds)
    ax.barh(names, [speeds[n] for n in names], color=["C0" if n.startswith("engine") else "C7" for n in names])
    for y, name in enumerate(names):
        ax.text(speeds[name], y, f" {speeds[name]:.1f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel(f"output tokens/s, batch 1, {record.get('threads', '?')} threads")
    ax.set_title(_title(record, source), fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, out)
    return speeds


def save_figure_beside(kind: str, record: dict, json_path: Path) -> None:
    """Called by the benchmark scripts after saving: the PNG next to the JSON, or a note when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install 'my-minimind[bench]')")
        return
    png = Path(json_path).with_suffix(".png")
    if kind == "engine":
        if engine_series(record):
            plot_engine(record, png, str(json_path))
    elif kind == "cpu_quant":
        plot_cpu_quant(record, png, str(json_path))
    else:
        plot_serve([(str(json_path), record)], png)
    print(f"drew {png}")


def _title(record: dict, source: str) -> str:
    return f"{Path(source).name or record.get('script', '')}: {record.get('machine') or record.get('device', '?')}, {record.get('date', '?')}"


def _save(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    fig.clf()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["engine", "serve"], help="which script wrote the JSON")
    parser.add_argument("json", nargs="+", type=Path, help="benchmark record(s); serve takes several to compare")
    parser.add_argument("--out", type=Path, help="PNG to write (default: the first JSON's name with .png)")
    args = parser.parse_args()
    out = args.out or args.json[0].with_suffix(".png")
    records = [(str(path), json.loads(path.read_text())) for path in args.json]
    if args.kind == "engine":
        if len(records) != 1:
            parser.error("engine draws one record at a time")
        plot_engine(records[0][1], out, records[0][0])
    else:
        plot_serve(records, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
