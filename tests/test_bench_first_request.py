"""benchmarks/bench_first_request.py against a live `minimind serve` (the tiny test model): it records what it says
it records, and refuses a split of first and steady requests that leaves either side empty."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_first_request


@pytest.mark.parametrize("first", ["0", "5", "9"])
def test_first_must_leave_a_steady_state(first, capsys):
    with pytest.raises(SystemExit):
        bench_first_request.parse_args(["--requests", "5", "--first", first])
    assert "--first must be at least 1 and below --requests" in capsys.readouterr().err


def test_a_run_records_every_request_and_the_first_and_steady_figures(tmp_path):
    out = tmp_path / "first.json"
    args = ["--requests", "5", "--first", "2", "--layouts", "", "--port", "8231", "--out", str(out)]
    assert bench_first_request.main(args) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "first-request" and report["machine"] and report["script"]
    (row,) = report["layouts"]
    ttfts = row["ttft_per_request_ms"]
    assert len(ttfts) == 5 and all(t > 0 for t in ttfts)
    assert row["first_ms"] == ttfts[0] and row["slowest_of_first_ms"] == max(ttfts[:2])
    assert row["steady_max_ms"] == max(ttfts[2:]) and min(ttfts[2:]) <= row["steady_median_ms"] <= max(ttfts[2:])
    assert row["healthy_after_s"] > 0 and "--served-model-name m" in row["command"]
