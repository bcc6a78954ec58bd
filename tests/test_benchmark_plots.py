"""benchmarks/plots.py redraws what a benchmark record holds, and nothing else."""

from __future__ import annotations

import json

import pytest

from benchmarks.plots import engine_series, plot_engine, plot_serve, serve_series
from tests.conftest import ROOT

pytest.importorskip("matplotlib", reason="the figures need matplotlib (bench and dev extras)")
RESULTS = ROOT / "benchmarks" / "results"


def test_engine_record_becomes_one_line_per_model_and_implementation(tmp_path):
    record = json.loads((RESULTS / "engine-h100-2026-11-23.json").read_text())
    series = plot_engine(record, tmp_path / "engine.png", "engine-h100-2026-11-23.json")
    small = next(m for m in record["models"] if m["model"] == "minimind2-small")
    assert series["minimind2-small, this engine"][0] == (1, small["engine_b1_tok_s"])
    assert (256, small["engine_256_out_tok_s"]) in series["minimind2-small, this engine"]
    assert series["minimind2-small, transformers"] == [(1, small["hf_b1_tok_s"]), (64, small["hf_64_out_tok_s"])]
    assert (tmp_path / "engine.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no engine_"):
        plot_engine({"models": [{"model": "x", "warmup_s": 1.0}]}, tmp_path / "none.png", "empty.json")
    assert engine_series({"models": []}) == {}


def test_serve_records_compare_backends_by_concurrency(tmp_path):
    paths = [RESULTS / "serve-native-h200-20261202.json", RESULTS / "serve-vllm-h200-20261202.json"]
    records = [(str(p), json.loads(p.read_text())) for p in paths]
    drawn = plot_serve(records, tmp_path / "serve.png")
    assert set(drawn) == {"native (minimind2-small)", "vllm (minimind2-small)"}
    native = records[0][1]["levels"]
    series = serve_series(records[0][1])
    assert series["output tok/s"] == [(lv["concurrency"], lv["output_throughput_tok_s"]) for lv in native]
    assert series["median TTFT (ms)"][0] == (native[0]["concurrency"], native[0]["ttft"]["median_ms"])
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_cpu_quant_record_becomes_one_bar_per_configuration(tmp_path):
    from benchmarks.plots import plot_cpu_quant

    record = json.loads((RESULTS / "cpu-quant-epyc-2core-2026-12-04.json").read_text())
    speeds = plot_cpu_quant(record, tmp_path / "quant.png", "cpu-quant-epyc-2core-2026-12-04.json")
    assert speeds == {name: entry["tok_s"] for name, entry in record["configs"].items()}
    assert {"engine int8", "engine int4", "HF transformers fp32"} <= set(speeds)
    assert (tmp_path / "quant.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no configs"):
        plot_cpu_quant({"configs": {}}, tmp_path / "none.png", "empty.json")
