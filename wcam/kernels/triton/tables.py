"""Pointer tables: how one kernel launch reads many tensors of different shapes where they already live."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

import triton.language as tl

TRITON_TYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.uint8: tl.uint8,
}


def triton_type(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type for a torch dtype, or a TypeError naming the ones the kernels take."""
    if dtype not in TRITON_TYPES:
        raise TypeError(f"the Triton kernels take {', '.join(map(str, TRITON_TYPES))}; got {dtype}")
    return TRITON_TYPES[dtype]


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp16 and bf16 accumulate (and produce maps) in fp32; fp32 and fp64 in themselves."""
    return torch.promote_types(dtype, torch.float32)


def upload(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Concatenate integer rows into one int64 tensor on ``device`` with one host-to-device copy.

    On CUDA the table is staged in pinned memory and copied asynchronously, so building it does not wait for
    the work already queued (the backward pass); torch's pinned allocator keeps the staging buffer alive
    until the copy has run.
    """
    flat = [int(v) for row in rows for v in row]
    if device.type != "cuda":
        return torch.tensor(flat, dtype=torch.int64, device=device)
    staged = torch.tensor(flat, dtype=torch.int64).pin_memory()
    return staged.to(device, non_blocking=True)
