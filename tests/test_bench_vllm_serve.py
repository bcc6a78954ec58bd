"""benchmarks/bench_vllm_serve.py on this machine (`--client builtin`, minimind only, CPU): it exports the shape,
serves it, times the first requests after start-up and each level, and saves what it printed."""

from __future__ import annotations

import json

from benchmarks import bench_vllm_serve


def test_a_builtin_run_records_the_first_requests_and_each_level(tmp_path):
    out = tmp_path / "run.json"
    args = ["--client", "builtin", "--servers", "minimind", "--shapes", "minimind2-small", "--concurrency", "1", "2"]
    args += ["--num-prompts", "2", "--input-len", "16", "--output-len", "4", "--minimind-args", "--device cpu"]
    args += ["--first-requests", "3", "--port", "8232", "--workdir", str(tmp_path), "--out", str(out)]
    assert bench_vllm_serve.main(args) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["backend"] == "minimind" and run["model"] == "minimind2-small"
    first = run["first_requests_ttft_ms"]
    assert len(first) == 3 and all(t > 0 for t in first)
    assert [level["concurrency"] for level in run["levels"]] == [1, 2]
    for level in run["levels"]:
        assert level["completed"] == 2 and level["failed"] == 0
        assert level["total_output_tokens"] == 8 and level["ttft"]["median_ms"] > 0
    assert (tmp_path / "run-minimind2-small.png").stat().st_size > 0
