"""benchmarks/bench_vllm_serve.py on this machine (`--client builtin`, minimind only, CPU): it exports the shape,
serves it, times the first requests after start-up and each level, and saves what it printed."""

from __future__ import annotations

import json

import pytest

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
        assert level["server_cores"] == sorted(level["server_cores"], reverse=True)
    assert (tmp_path / "run-minimind2-small.png").stat().st_size > 0


def test_server_cores_count_every_process_of_the_servers_session():
    """A process that burns CPU in its own session is found with its CPU seconds, and one outside it is not."""
    import subprocess
    import sys
    import time

    busy = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", busy], start_new_session=True)
    try:
        before = bench_vllm_serve.session_cpu_seconds(proc.pid)
        assert set(before) == {proc.pid}
        time.sleep(1.5)
        after = bench_vllm_serve.session_cpu_seconds(proc.pid)
        assert after[proc.pid] - before[proc.pid] >= 0.2
        cores = bench_vllm_serve.cores_used({}, after, 1.0)
        assert cores == [round(after[proc.pid], 2)] and cores[0] >= 0.4
    finally:
        proc.kill()
        proc.wait()


def test_a_negative_count_of_first_requests_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_vllm_serve.parse_args(["--first-requests", "-1"])
    assert "--first-requests must be 0 or more" in capsys.readouterr().err
