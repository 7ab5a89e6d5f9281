"""Grad-CAM map and score of every (image, layer) pair in three launches (spec steps 3-6).

1. ``_channel_weights_kernel``, one program per (image, layer, block of channels):
   ``alpha[b, k] = (1 / hw) sum_uv G[b, k, u, v]``.
2. ``_layer_cam_kernel``, one program per (image, layer, block of pixels):
   ``M[b, uv] = max(sum_k alpha[b, k] A[b, k, uv], 0)`` and, from the program holding pixel 0,
   ``s[b] = max((1 / C) sum_k alpha[b, k], 0)``.
3. ``_normalize_kernel``, one program per (image, layer): ``M <- (M - min M) / (max M - min M)``, or 0 for a
   constant map or one holding NaN.

Activations and gradients are read in place in fp16, bf16, fp32 or fp64 and accumulated in fp32 (fp64 for
fp64). Any layout whose (h, w) plane has one pixel stride (NCHW, channels-last) is read as it is, so the
kernels index pixels without a division; other views are copied first. Work is listed per layer in a table of (layer, start) items,
so a launch's grid is the total number of channel or pixel blocks over all layers, times the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

import triton
import triton.language as tl

from wcam.kernels.layer_maps import LayerMaps
from wcam.kernels.triton.ieee import divide, min_max_scaled
from wcam.kernels.triton.tables import accumulator, triton_type, upload, work_items

# One row of the layer table, as the kernels read it: 0 activation address, 1 gradient address, 2 channels,
# 3 pixels (h * w), 4-6 activation strides (batch, channel, pixel), 7-9 gradient strides, 10 output map
# address, 11 output batch stride, 12 the layer's first column in the alpha buffer.
_FIELDS = 13



@dataclass(frozen=True)
class Blocks:
    """Tile sizes: channels x pixels per step of the channel-weight and the map kernels, pixels per step of
    the normalisation, and warps per program. The defaults were the fastest of 7 tilings on an H100
    (resnet50, batch 64, fp32 and bf16; ``bench/gpu.py``, section 2b)."""

    weights_c: int = 8
    weights_hw: int = 256
    map_c: int = 16
    map_hw: int = 256
    norm: int = 256
    warps: int = 8


@triton.jit(do_not_specialize=["alpha_stride"])
def _channel_weights_kernel(table, work, alpha, alpha_stride, DT: tl.constexpr, FIELDS: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """alpha[b, off + k] = mean over (u, v) of G[b, k, u, v] for the program's block of channels k."""
    item = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    layer = tl.load(work + 2 * item)
    c0 = tl.load(work + 2 * item + 1)
    row = table + layer * FIELDS
    grad = tl.load(row + 1).to(tl.pointer_type(DT))
    channels = tl.load(row + 2)
    hw = tl.load(row + 3)
    acc_type = alpha.dtype.element_ty
    ks = c0 + tl.arange(0, BLOCK_C)
    kmask = ks < channels
    base = grad + b * tl.load(row + 7) + ks[:, None] * tl.load(row + 8)
    s_pix = tl.load(row + 9)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_type)
    for start in range(0, hw, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        g = tl.load(base + pix[None, :] * s_pix, mask=kmask[:, None] & (pix < hw)[None, :], other=0.0)
        acc += g.to(acc_type)
    mean = divide(tl.sum(acc, axis=1), hw.to(acc_type))
    tl.store(alpha + b * alpha_stride + tl.load(row + 12) + ks, mean, mask=kmask)


@triton.jit(do_not_specialize=["alpha_stride", "num_layers"])
def _layer_cam_kernel(table, work, alpha, alpha_stride, scores, num_layers, DT: tl.constexpr,
                      FIELDS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """M[b, uv] = ReLU(sum_k alpha[b, k] A[b, k, uv]) on the program's pixels; the layer score from pixel 0."""
    item = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    layer = tl.load(work + 2 * item)
    p0 = tl.load(work + 2 * item + 1)
    row = table + layer * FIELDS
    act = tl.load(row).to(tl.pointer_type(DT))
    channels = tl.load(row + 2)
    hw = tl.load(row + 3)
    acc_type = alpha.dtype.element_ty
    pix = p0 + tl.arange(0, BLOCK_HW)
    pmask = pix < hw
    where = pix * tl.load(row + 6)
    base = act + b * tl.load(row + 4)
    s_chan = tl.load(row + 5)
    weights = alpha + b * alpha_stride + tl.load(row + 12)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_type)
    alpha_sum = tl.zeros([BLOCK_C], dtype=acc_type)
    for c0 in range(0, channels, BLOCK_C):
        ks = c0 + tl.arange(0, BLOCK_C)
        kmask = ks < channels
        a_k = tl.load(weights + ks, mask=kmask, other=0.0)
        values = tl.load(base + ks[:, None] * s_chan + where[None, :], mask=kmask[:, None] & pmask[None, :], other=0.0)
        acc += a_k[:, None] * values.to(acc_type)
        alpha_sum += a_k
    cam = tl.sum(acc, axis=0)
    out = tl.load(row + 10).to(tl.pointer_type(acc_type)) + b * tl.load(row + 11)
    tl.store(out + pix, tl.where(cam < 0, 0.0, cam), mask=pmask)  # ReLU; NaN stays NaN, as torch's
    if p0 == 0:
        score = divide(tl.sum(alpha_sum, axis=0), channels.to(acc_type))
        tl.store(scores + b * num_layers + layer, tl.where(score < 0, 0.0, score))  # NaN stays NaN


@triton.jit
def _normalize_kernel(table, ACC: tl.constexpr, FIELDS: tl.constexpr, BLOCK: tl.constexpr):
    """Min-max normalise one (image, layer) map in place; a constant map, or one holding NaN, becomes zeros."""
    layer = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = table + layer * FIELDS
    hw = tl.load(row + 3)
    out = tl.load(row + 10).to(tl.pointer_type(ACC)) + b * tl.load(row + 11)
    low = tl.full([BLOCK], float("inf"), ACC)
    high = tl.full([BLOCK], float("-inf"), ACC)
    nan = tl.zeros([BLOCK], tl.int32)
    for start in range(0, hw, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        m = pix < hw
        v = tl.load(out + pix, mask=m, other=0.0)
        low = tl.minimum(low, tl.where(m, v, float("inf")))
        high = tl.maximum(high, tl.where(m, v, float("-inf")))
        nan += (v != v).to(tl.int32)
    lo = tl.min(low, axis=0)
    # a map holding NaN becomes zeros, as in the torch path (a GPU's min and max skip NaN, numpy's keep it)
    spread = tl.where(tl.sum(nan, axis=0) > 0, 0.0, tl.max(high, axis=0) - lo)
    for start in range(0, hw, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        m = pix < hw
        v = tl.load(out + pix, mask=m, other=0.0)
        tl.store(out + pix, min_max_scaled(v, lo, spread), mask=m)


def _check(activations: Sequence[Tensor], gradients: Sequence[Tensor]) -> torch.dtype:
    if len(activations) != len(gradients) or not activations:
        raise ValueError(f"need one gradient per activation, got {len(activations)} and {len(gradients)}")
    first = activations[0]
    for i, (a, g) in enumerate(zip(activations, gradients)):
        if a.dim() != 4 or a.shape != g.shape:
            raise ValueError(f"layer {i}: activation {tuple(a.shape)} and gradient {tuple(g.shape)} must be equal B x C x h x w")
        if a.shape[0] != first.shape[0] or a.device != first.device:
            raise ValueError(f"layer {i}: every layer must have the batch size and device of layer 0")
        if a.dtype != first.dtype or g.dtype != first.dtype:
            raise TypeError(f"layer {i}: {a.dtype}/{g.dtype}, but one launch takes one dtype ({first.dtype})")
    triton_type(first.dtype)
    return first.dtype


def _one_pixel_stride(x: Tensor) -> tuple[Tensor, int]:
    """``(x, s)`` with pixel (u, v) of each channel at ``(u * w + v) * s``: ``x`` itself where its layout
    allows, else a contiguous copy. A size-1 dim's stride says nothing (torch ignores it, and calls a
    ``B x C x h x 1`` transposed view contiguous), so a single column steps by ``stride(2)``."""
    h, w = x.shape[2:]
    if w == 1:
        return x, x.stride(2)
    if h == 1 or x.stride(2) == w * x.stride(3):
        return x, x.stride(3)
    x = x.contiguous()
    return x, x.stride(3)


def layer_maps(activations: Sequence[Tensor], gradients: Sequence[Tensor], blocks: Blocks = Blocks()) -> LayerMaps:
    """Triton twin of :func:`wcam.kernels.layer_maps`: the same :class:`LayerMaps`, computed in 3 launches."""
    dtype = _check(activations, gradients)
    acc = accumulator(dtype)
    batch, device = activations[0].shape[0], activations[0].device
    readable = [(*_one_pixel_stride(a), *_one_pixel_stride(g)) for a, g in zip(activations, gradients)]  # alive until launched
    members: dict[tuple[int, int], list[int]] = {}
    for index, (a, *_) in enumerate(readable):
        members.setdefault(tuple(a.shape[-2:]), []).append(index)
    rows = np.empty((len(readable), _FIELDS), dtype=np.int64)
    groups = {}
    for (h, w), indices in members.items():
        maps = torch.empty((batch, len(indices), h, w), dtype=acc, device=device)
        groups[(h, w)] = (indices, maps)
        rows[indices, 10] = maps.data_ptr() + np.arange(len(indices)) * (h * w * maps.element_size())
        rows[indices, 11] = maps.stride(0)
    for index, (a, a_pixel, g, g_pixel) in enumerate(readable):
        rows[index, :10] = (a.data_ptr(), g.data_ptr(), a.shape[1], a.shape[2] * a.shape[3], a.stride(0),
                            a.stride(1), a_pixel, g.stride(0), g.stride(1), g_pixel)
    rows[:, 12] = np.cumsum(rows[:, 2]) - rows[:, 2]  # each layer's first column in alpha
    channel_items = work_items(rows[:, 2], blocks.weights_c)
    pixel_items = work_items(rows[:, 3], blocks.map_hw)
    table, channel_work, pixel_work = upload([rows, channel_items, pixel_items], device)
    width = int(rows[:, 2].sum())
    alpha = torch.empty((batch, width), dtype=acc, device=device)
    scores = torch.empty((batch, len(rows)), dtype=acc, device=device)
    dt = triton_type(dtype)
    _channel_weights_kernel[(len(channel_items), batch)](
        table, channel_work, alpha, width, DT=dt, FIELDS=_FIELDS, BLOCK_C=blocks.weights_c,
        BLOCK_HW=blocks.weights_hw, num_warps=blocks.warps,
    )
    _layer_cam_kernel[(len(pixel_items), batch)](
        table, pixel_work, alpha, width, scores, len(rows), DT=dt, FIELDS=_FIELDS, BLOCK_C=blocks.map_c,
        BLOCK_HW=blocks.map_hw, num_warps=blocks.warps,
    )
    _normalize_kernel[(len(rows), batch)](table, ACC=triton_type(acc), FIELDS=_FIELDS, BLOCK=blocks.norm,
                                          num_warps=blocks.warps)
    return LayerMaps(groups=groups, scores=scores)
