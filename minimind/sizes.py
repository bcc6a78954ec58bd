"""Sizes in bytes as people write them ('2GiB', '512MiB', '4MB'): parsed for flags, formatted for messages.

Shared by the server's settings and the engine's command-line flags (--kv-cache-memory, --max-request-bytes).
"""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40})
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def byte_size(text: str) -> int:
    """'2GiB', '512MiB', '4MB', '1.5G' or plain bytes as a number of bytes (KiB/MiB/GiB and bare K/M/G are
    powers of 1024, KB/MB/GB powers of 1000)."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write bytes or a number with a unit, e.g. 2GiB, 512MiB, 4MB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(num_bytes: int) -> str:
    """4194304 -> '4MiB', 24159191040 -> '22.5GiB': the largest binary unit, one decimal rounded up."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        size = _UNITS[unit.lower()]
        if num_bytes >= size:
            tenths = math.ceil(num_bytes * 10 / size)
            return f"{tenths // 10}{unit}" if tenths % 10 == 0 else f"{tenths / 10:.1f}{unit}"
    return str(num_bytes)


byte_size.__name__ = "size"  # argparse and the variable check name the type by it
