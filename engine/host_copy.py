"""Host lists to device tensors without stalling the step pipeline.

`torch.tensor(values, device="cuda")` copies from pageable memory, and such a copy waits for every kernel already
queued on the stream: the host then idles until the GPU has finished the previous step, so the next step's
Python work (scheduling, detokenizing, building deltas) can no longer overlap it. Measured on an H200 at 48
sampled rows this cost about 0.4 ms of a 2.7 ms decode step. From pinned memory the copy is queued like a kernel.
"""

from __future__ import annotations

import torch


def to_device(
    values: list | torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """`values` (a list, or a host tensor kept as it is) as a tensor on `device`, queued behind the stream's work
    instead of waiting for it (CUDA)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
