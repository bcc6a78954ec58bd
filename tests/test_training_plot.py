"""`minimind plot RUN_DIR`: a real run's metrics.jsonl becomes a PNG; resumed rows win; bad files say where."""

from __future__ import annotations

import json

import pytest

from minimind.cli import main
from tests.test_training_support import sentences, train, write_jsonl
from training.errors import TrainingError
from training.plot import plot_metrics, read_metrics

pytest.importorskip("matplotlib", reason="minimind plot needs matplotlib (bench and dev extras)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_draws_a_real_run(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": t} for t in sentences(8)])
    run = train(tmp_path, data_path=str(data), max_steps=6, lr=1e-2, log_every=1, grad_clip=1.0)
    series = read_metrics(run / "metrics.jsonl")
    assert [step for step, _ in series["loss"]] == list(range(1, 7))
    assert "samples" not in series  # run information, not a curve

    assert main(["plot", str(run)]) == 0
    drawn = capsys.readouterr().out
    assert f"wrote {run / 'metrics.png'} (loss, lr, grad_norm, tokens_per_s" in drawn
    width, height = png_size(run / "metrics.png")
    assert width > 600 and height > 500  # two columns, at least two rows of panels

    assert main(["plot", str(run), "--metrics", "loss", "--out", str(tmp_path / "loss.png")]) == 0
    one_width, one_height = png_size(tmp_path / "loss.png")
    assert one_width < width and one_height < height


def test_a_resumed_step_keeps_the_row_written_last(tmp_path):
    rows = [{"step": 0, "samples": 10.0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    rows += [{"step": 0, "samples": 10.0}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": 3.0, "lr": 1e-3}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = read_metrics(path)
    assert series["loss"] == [(1, 5.0), (2, 3.5), (3, 3.0)]
    assert series["lr"] == [(3, 1e-3)]


def test_bad_inputs_say_what_and_where(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 1
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    with pytest.raises(TrainingError, match=r"metrics.jsonl:2: not a metrics row"):
        read_metrics(path)
    path.write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(TrainingError, match="--metrics: grad_norm not logged in this run; logged: loss"):
        plot_metrics(read_metrics(path), tmp_path / "x.png", only=["grad_norm"])
    path.write_text('{"step": 0, "samples": 3}\n')
    with pytest.raises(TrainingError, match="logged no metrics yet"):
        plot_metrics(read_metrics(path), tmp_path / "x.png")
