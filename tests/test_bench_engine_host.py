"""benchmarks/bench_engine_host.py: its counts are checked before any model is built, and a short run keeps every
sequence running through the timed steps."""

from __future__ import annotations

import pytest

from benchmarks import bench_engine_host


@pytest.mark.parametrize(
    "argv, flag", [(["--rows", "64", "0"], "--rows"), (["--steps", "0"], "--steps"), (["--repeats", "-1"], "--repeats")]
)
def test_a_count_below_one_is_refused_with_the_flag_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_engine_host.parse_args(argv)
    assert exit_info.value.code == 2 and f"{flag} must be 1 or more" in capsys.readouterr().err


def test_a_short_run_times_every_repeat_with_all_rows_running():
    result = bench_engine_host.time_rows(rows=4, steps=3, repeats=2)
    assert result["rows"] == 4 and len(result["runs_us"]) == 2
    assert result["best_us"] == min(result["runs_us"]) > 0 and result["best_us_per_row"] == result["best_us"] / 4
