"""What every benchmark record says about how it was obtained: the script, the exact command, when and where.

A figure in benchmarks/results must be traceable to the run that wrote it, so each script puts this block at the top
of its JSON. Figures a script did not measure itself are stored under keys that start with `quoted_`, with their
source, never beside measured ones under a measured-looking name.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_name() -> str:
    """GPU name(s) when nvidia-smi answers, else the CPU model, with the core count."""
    try:
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpus = ""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{gpus.replace(chr(10), ' + ') + ', ' if gpus else ''}{cpu}, {cores} cores"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return commit + ("+uncommitted changes" if dirty.stdout.strip() else "") if commit else "unknown"
    except OSError:
        return "unknown"


def provenance(script: str) -> dict:
    """{"script", "command", "commit", "date", "machine"} for the record `script` (its __file__) is writing."""
    path = Path(script).resolve()
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return {
        "script": name,
        "command": shlex.join(["python", name, *sys.argv[1:]]),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_name(),
    }
