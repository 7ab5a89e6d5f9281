"""Pointer tables: how one kernel launch reads many tensors of different shapes where they already live."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

import triton.language as tl

from wcam.kernels.transfer import to_device

TRITON_TYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def triton_type(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type for a torch dtype, or a TypeError naming the ones the kernels take."""
    if dtype not in TRITON_TYPES:
        raise TypeError(f"the Triton kernels take {', '.join(map(str, TRITON_TYPES))}; got {dtype}")
    return TRITON_TYPES[dtype]


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp16 and bf16 accumulate (and produce maps) in fp32; fp32 and fp64 in themselves."""
    return torch.promote_types(dtype, torch.float32)


def work_items(sizes: np.ndarray, block: int) -> np.ndarray:
    """``n x 2`` rows ``(layer, start)``: one per block of ``block`` elements of each layer's ``sizes[l]``."""
    counts = -(-sizes // block)
    layer = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([layer, (np.arange(int(counts.sum()), dtype=np.int64) - first) * block], axis=1)


def upload(parts: list[np.ndarray], device: torch.device) -> list[Tensor]:
    """int64 arrays to ``device`` with one host-to-device copy (see :func:`wcam.kernels.transfer.to_device`);
    returns one flat tensor view per array."""
    flat = torch.from_numpy(np.concatenate([np.ascontiguousarray(p, dtype=np.int64).ravel() for p in parts]))
    on_device = to_device(flat, device)
    views, start = [], 0
    for part in parts:
        views.append(on_device[start : start + part.size])
        start += part.size
    return views
