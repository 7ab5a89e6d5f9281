"""Host-to-device copies that do not stall the GPU queue."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """``values`` (a CPU tensor) on ``device``. A copy from ordinary (pageable) host memory to a GPU waits
    for all work queued on the stream, which would stall the host after every backward pass; staging in
    pinned memory lets the copy queue behind that work instead. torch's pinned allocator keeps the staging
    buffer alive until the copy has run."""
    if device.type != "cuda" or values.device == device:
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
