"""benchmarks/bench_vllm_serve.py on this machine (`--client builtin`, minimind only, CPU): it exports the shape,
serves it, times the first requests after start-up and each level, and saves what it printed."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_vllm_serve


def test_a_builtin_run_records_the_client_ceiling_each_variant_and_the_offline_engine_with_their_steps(tmp_path):
    out = tmp_path / "run.json"
    args = ["--client", "builtin", "--servers", "minimind", "--shapes", "minimind2-small", "--concurrency", "1", "2"]
    args += ["--num-prompts", "2", "--input-len", "16", "--output-len", "4", "--minimind-args", "--device cpu"]
    args += ["--minimind-args", "--device cpu --stream-interval 2", "--client-ceiling", "1", "3", "--offline"]
    args += ["--first-requests", "3", "--port", "8232", "--workdir", str(tmp_path), "--out", str(out)]
    assert bench_vllm_serve.main(args) == 0
    report = json.loads(out.read_text())
    assert [c["tokens_per_event"] for c in report["client_ceiling"]] == [1, 3]
    for ceiling in report["client_ceiling"]:  # the null server at the highest level: every token counted
        assert ceiling["concurrency"] == 2 and ceiling["completed"] == 2 and ceiling["total_output_tokens"] == 8
    plain, coalesced, offline = report["runs"]
    # the offline engine gets both prompts at once: one prefill step, then 3 decode steps for the other 3 tokens
    assert offline["backend"] == "offline engine" and offline["engine_steps"] == {"prefill": 1, "decode": 3}
    assert offline["temperature"] == 0  # the builtin client asks for greedy output, so the offline run does too
    assert plain["label"] == "minimind --device cpu" and coalesced["label"].endswith("--stream-interval 2")
    for run in (plain, coalesced):
        assert run["backend"] == "minimind" and run["model"] == "minimind2-small"
        first = run["first_requests_ttft_ms"]
        assert len(first) == 3 and all(t > 0 for t in first)
        assert [level["concurrency"] for level in run["levels"]] == [1, 2]
        for level in run["levels"]:
            assert level["completed"] == 2 and level["failed"] == 0
            assert level["total_output_tokens"] == 8 and level["ttft"]["median_ms"] > 0
            assert level["server_cores"] == sorted(level["server_cores"], reverse=True)
            steps = level["engine_steps"]  # two requests of 4 tokens: at least a prefill and 3 decode steps
            assert steps["prefill"] >= 1 and steps["decode"] >= 3 and 0 < level["share_of_offline"]
    assert "--stream-interval 2" in coalesced["command"] and "--stream-interval" not in plain["command"]
    assert (tmp_path / "run-minimind2-small.png").stat().st_size > 0


def test_the_null_server_streams_max_tokens_in_events_of_the_given_size_on_a_kept_alive_connection():
    import httpx

    from benchmarks.null_server import NullServer

    with NullServer(8233, tokens_per_event=3, workers=2), httpx.Client(base_url="http://127.0.0.1:8233") as client:
        assert client.get("/health").status_code == 200
        for _ in range(2):
            texts, usage = [], None
            body = {"prompt": "hi", "max_tokens": 7, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            for data in map(json.loads, lines[:-1]):
                if data["choices"]:
                    texts.append(data["choices"][0]["text"])
                else:
                    usage = data["usage"]
            assert texts == [" x x x", " x x x", " x"] and usage["completion_tokens"] == 7


def test_a_client_ceiling_below_one_token_per_event_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_vllm_serve.parse_args(["--client-ceiling", "0"])
    assert "tokens per event, 1 or more" in capsys.readouterr().err


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


def test_the_offline_run_samples_as_the_clients_requests_do():
    """`vllm bench serve` sends no temperature (the server samples at its default, 1.0); the builtin client asks for
    greedy output. Compared with a greedy offline run, a sampling server would be measured against less work."""
    vllm_client = bench_vllm_serve.offline_params(bench_vllm_serve.parse_args(["--output-len", "7"]))
    builtin = bench_vllm_serve.offline_params(bench_vllm_serve.parse_args(["--client", "builtin"]))
    assert (vllm_client.temperature, vllm_client.max_tokens, vllm_client.ignore_eos) == (1.0, 7, True)
    assert builtin.temperature == 0 and builtin.max_tokens == 128
