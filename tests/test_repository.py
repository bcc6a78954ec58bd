"""The repository stands on its own and says how its figures were obtained.

- No tracked file (outside .ci/) reads or names a path outside the repository: a user's clone has nothing beside it.
- Every benchmark record names the script and the command that wrote it; figures it did not measure are quoted.
- Every `--dtype` takes the spellings torch, transformers and vLLM users type.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess

import pytest
import torch

from tests.conftest import ROOT

# Spelled in pieces so that this file does not match itself.
OUTSIDE = [
    ".." + "/shared",
    "shared" + "/fixtures",
    "ROOT" + ".parent",
    "/work" + "/",
]


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    binary = (".png", ".jpg", ".pth", ".pt", ".safetensors", ".gguf", ".whl")
    return [f for f in out if not f.startswith(".ci/") and not f.endswith(binary) and (ROOT / f).is_file()]


def test_no_tracked_file_reads_a_path_outside_the_repository():
    offenders = []
    for name in tracked_text_files():
        if name.startswith("benchmarks/results/"):
            continue  # records of past runs: they name the paths those runs used (checked below for the rest)
        text = (ROOT / name).read_text(errors="replace")
        offenders += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_python_code_never_climbs_above_the_repository_root():
    """`Path(__file__).parents[N]` or `.parent` chains must stop at the repository root."""
    offenders = []
    for name in tracked_text_files():
        if not name.endswith(".py"):
            continue
        depth = name.count("/")  # folders between the file and the root
        text = (ROOT / name).read_text()
        for match in re.finditer(r"Path\(__file__\)\.resolve\(\)((?:\.parent)+|\.parents\[(\d+)\])", text):
            climbs = int(match.group(2)) + 1 if match.group(2) else match.group(1).count(".parent")
            if climbs > depth + 1:
                offenders.append(f"{name}: {match.group(0)}")
    assert not offenders, offenders


def test_every_benchmark_record_says_how_it_was_obtained():
    records = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        assert {"script", "command"} <= set(record), f"{path.name}: no script/command"
        script = record["script"].split()[0]
        assert (ROOT / script).is_file(), f"{path.name}: {script} is not in the repository"
        text = json.dumps(record)
        # A figure from elsewhere must be stored under a quoted_* key, with its source.
        if "upstream_h100" in text:
            assert "quoted_upstream_h100" in text and "quoted_upstream_source" in record, path.name


def test_benchmark_scripts_write_provenance():
    for script in ["bench_engine", "bench_serve", "bench_train", "bench_sampling", "serve_suite", "train_demo"]:
        text = (ROOT / "benchmarks" / f"{script}.py").read_text()
        assert "provenance(__file__)" in text, f"benchmarks/{script}.py writes a record without provenance"


SPELLINGS = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "BF16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_dtype_flag_takes_the_usual_spellings(spelling):
    from engine.cli import args as cli_args
    from models.cli import convert as convert_cli
    from models.loader import resolve_dtype
    from server import settings as server_settings
    from training.config import TrainConfig
    from training.setup import precision

    assert resolve_dtype(spelling, "cpu") == SPELLINGS[spelling]
    for add in (cli_args.add_model_arguments, convert_cli.add_arguments, server_settings.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        extra = ["SRC", "OUT"] if add is convert_cli.add_arguments else []
        assert parser.parse_args([*extra, "--dtype", spelling]).dtype.lower() == spelling.lower()
    server_settings.validate(server_settings.Settings(dtype=spelling))
    TrainConfig(dtype=spelling).validate()
    if SPELLINGS[spelling] == torch.float32:
        assert precision(spelling, torch.device("cpu")) == (None, False)


def test_an_unknown_dtype_is_refused_with_the_accepted_spellings():
    from models.errors import CheckpointError
    from models.loader import resolve_dtype
    from server import settings as server_settings
    from training.config import TrainConfig
    from training.errors import TrainingError

    with pytest.raises(CheckpointError, match="bfloat16.*float16.*float32"):
        resolve_dtype("float8", "cpu")
    with pytest.raises(server_settings.SettingsError, match="--dtype.*bfloat16"):
        server_settings.validate(server_settings.Settings(dtype="int4"))
    with pytest.raises(TrainingError, match="dtype.*bfloat16"):
        TrainConfig(dtype="double").validate()
