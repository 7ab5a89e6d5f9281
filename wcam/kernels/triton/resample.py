"""Resample, weight, sum and normalise every layer map in three launches (spec steps 9-10), optionally
blending the coloured heatmap into the frame.

1. ``_star_kernel``, one program per (image, block of pixels at the largest layer size (h*, w*)):
   ``S*[b, y, x] = sum_l w[b, l] R_l(y, x)``, with R_l layer l's normalised map resampled from (h_l, w_l);
   layers of weight 0 are skipped. No (L x h* x w*) stack is ever written.
2. ``_upsample_kernel``, one program per (image, block of output pixels): ``S = R(S*)`` at the output size
   (which may be a 1920 x 1080 frame), optionally written, and its per-image min and max (atomics).
3. ``_render_kernel``: resamples S* again (cheaper than reading S back) and writes
   ``(S - min S) / (max S - min S)`` (0 for a constant map), or, with a frame, the Turbo colour of that value
   blended into the uint8 RGB frame: ``round((1 - alpha) frame + alpha colour)``.

R is torch's ``interpolate``: bilinear with align_corners=False (source ``max((i + 0.5) in / out - 0.5, 0)``,
computed in the maps' dtype) or nearest (``min(floor(i * (in / out)), in - 1)`` in fp32), so the results
equal the torch path's to rounding.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

import triton
import triton.language as tl

from wcam.kernels.resample import INTERPOLATIONS
from wcam.kernels.triton.tables import upload

BLOCK = 256


@triton.jit
def _sample(src, h, w, y, x, out_h, out_w, m, NEAREST: tl.constexpr):
    """Values of the h x w map at ``src`` resampled to out_h x out_w, at output pixels (y, x)."""
    if NEAREST:
        sy = tl.minimum((y.to(tl.float32) * (h.to(tl.float32) / out_h.to(tl.float32))).to(tl.int64), h - 1)
        sx = tl.minimum((x.to(tl.float32) * (w.to(tl.float32) / out_w.to(tl.float32))).to(tl.int64), w - 1)
        value = tl.load(src + sy * w + sx, mask=m, other=0.0)
    else:
        acc = src.dtype.element_ty
        fy = tl.maximum((y.to(acc) + 0.5) * (h.to(acc) / out_h.to(acc)) - 0.5, 0.0)
        fx = tl.maximum((x.to(acc) + 0.5) * (w.to(acc) / out_w.to(acc)) - 0.5, 0.0)
        y0 = fy.to(tl.int64)
        x0 = fx.to(tl.int64)
        y1 = y0 + (y0 < h - 1).to(tl.int64)
        x1 = x0 + (x0 < w - 1).to(tl.int64)
        ly = fy - y0.to(acc)
        lx = fx - x0.to(acc)
        top = (1.0 - lx) * tl.load(src + y0 * w + x0, mask=m, other=0.0) + lx * tl.load(src + y0 * w + x1, mask=m, other=0.0)
        bottom = (1.0 - lx) * tl.load(src + y1 * w + x0, mask=m, other=0.0) + lx * tl.load(src + y1 * w + x1, mask=m, other=0.0)
        value = (1.0 - ly) * top + ly * bottom
    return value


@triton.jit(do_not_specialize=["num_rows", "num_layers", "star_h", "star_w"])
def _star_kernel(table, num_rows, weights, num_layers, star, star_h, star_w, stats,
                 NEAREST: tl.constexpr, BLOCK: tl.constexpr):
    """S*[b] on the program's pixels: the weighted sum of every listed layer map resampled to (h*, w*)."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_type = star.dtype.element_ty
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    m = pix < star_h * star_w
    y = pix // star_w
    x = pix % star_w
    total = tl.zeros([BLOCK], dtype=acc_type)
    for r in range(num_rows):
        row = table + r * 5  # a row: map address, batch stride, height, width, layer index
        weight = tl.load(weights + b * num_layers + tl.load(row + 4))
        if weight != 0:
            src = tl.load(row).to(tl.pointer_type(acc_type)) + b * tl.load(row + 1)
            total += weight * _sample(src, tl.load(row + 2), tl.load(row + 3), y, x, star_h, star_w, m, NEAREST)
    tl.store(star + b * star_h * star_w + pix, total, mask=m)
    if tile == 0:  # stream order: these are set before the next launch reduces into them
        tl.store(stats + 2 * b, float("inf"))
        tl.store(stats + 2 * b + 1, float("-inf"))


@triton.jit
def _output_tile(star, star_h, star_w, out_h, out_w, NEAREST: tl.constexpr, BLOCK: tl.constexpr):
    """This program's image b, output pixels, their mask and the values of R(S*[b]) there."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = pix < out_h * out_w
    v = _sample(star + b * star_h * star_w, star_h, star_w, pix // out_w, pix % out_w, out_h, out_w, m, NEAREST)
    return b, pix, m, v


@triton.jit(do_not_specialize=["star_h", "star_w", "out_h", "out_w"])
def _upsample_kernel(star, star_h, star_w, sums, out_h, out_w, stats, WRITE: tl.constexpr,
                     NEAREST: tl.constexpr, BLOCK: tl.constexpr):
    """S = R(S*) on the program's output pixels: written if WRITE, and reduced into the image's min/max."""
    b, pix, m, v = _output_tile(star, star_h, star_w, out_h, out_w, NEAREST, BLOCK)
    if WRITE:
        tl.store(sums + b * out_h * out_w + pix, v, mask=m)
    tl.atomic_min(stats + 2 * b, tl.min(tl.where(m, v, float("inf")), axis=0))
    tl.atomic_max(stats + 2 * b + 1, tl.max(tl.where(m, v, float("-inf")), axis=0))


@triton.jit(do_not_specialize=["star_h", "star_w", "out_h", "out_w", "alpha"])
def _render_kernel(star, star_h, star_w, out_h, out_w, stats, heat, frames, lut, alpha, BLEND: tl.constexpr,
                   NEAREST: tl.constexpr, BLOCK: tl.constexpr):
    """The normalised heatmap on the program's output pixels, or (BLEND) the frame with it blended in."""
    b, pix, m, v = _output_tile(star, star_h, star_w, out_h, out_w, NEAREST, BLOCK)
    low = tl.load(stats + 2 * b)
    spread = tl.load(stats + 2 * b + 1) - low
    h = tl.where(spread > 0, (v - low) / tl.where(spread > 0, spread, 1.0), 0.0)
    if BLEND:
        index = (tl.minimum(tl.maximum(h.to(tl.float32), 0.0), 1.0) * 255.0 + 0.5).to(tl.int32)
        at = b * out_h * out_w * 3 + pix * 3
        for c in tl.static_range(3):
            colour = tl.load(lut + index * 3 + c, mask=m, other=0).to(tl.float32)
            image = tl.load(frames + at + c, mask=m, other=0).to(tl.float32)
            mixed = (1.0 - alpha) * image + alpha * colour + 0.5
            tl.store(heat + at + c, tl.minimum(tl.maximum(mixed, 0.0), 255.0).to(tl.uint8), mask=m)
    else:
        tl.store(heat + b * out_h * out_w + pix, h, mask=m)


def _interpolation(interpolation: str) -> bool:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return interpolation == "nearest"


def star_sum(
    groups: Iterable[tuple[tuple[int, int], list[int], Tensor]], weights: Tensor, interpolation: str
) -> tuple[Tensor, Tensor]:
    """``(S* B x h* x w*, stats)``: the weighted sum at the largest layer size, in one launch; ``stats``
    (B x 2) is scratch for :func:`upsample` and :func:`render`."""
    nearest = _interpolation(interpolation)
    groups = list(groups)
    if not groups:
        raise ValueError("no layer maps to sum")
    star_h = max(size[0] for size, _, _ in groups)
    star_w = max(size[1] for size, _, _ in groups)
    first = groups[0][2]
    batch, dtype, device = first.shape[0], first.dtype, first.device
    rows = []
    for (h, w), indices, maps in groups:
        if maps.dtype != dtype or maps.shape[0] != batch or maps.stride()[1:] != (h * w, w, 1):
            raise ValueError("layer maps must share dtype and batch, each h x w map contiguous")
        address = maps.data_ptr() + np.arange(len(indices), dtype=np.int64) * (h * w * maps.element_size())
        rows.append(np.stack([address, np.full_like(address, maps.stride(0)), np.full_like(address, h),
                              np.full_like(address, w), np.asarray(indices, dtype=np.int64)], axis=1))
    (table,) = upload([np.concatenate(rows)], device)
    star = torch.empty((batch, star_h, star_w), dtype=dtype, device=device)
    stats = torch.empty((batch, 2), dtype=dtype, device=device)
    grid = (triton.cdiv(star_h * star_w, BLOCK), batch)
    _star_kernel[grid](
        table, table.numel() // 5, weights.to(dtype).contiguous(), weights.shape[1], star, star_h, star_w, stats,
        NEAREST=nearest, BLOCK=BLOCK,
    )
    return star, stats


def upsample(star: Tensor, stats: Tensor, out_size: tuple[int, int], interpolation: str, write: bool = True) -> Tensor | None:
    """``S = R(S*)`` at ``out_size`` (returned if ``write``), reducing its per-image min/max into ``stats``."""
    out_h, out_w = out_size
    batch, star_h, star_w = star.shape
    sums = torch.empty((batch, out_h, out_w), dtype=star.dtype, device=star.device) if write else star
    grid = (triton.cdiv(out_h * out_w, BLOCK), batch)
    _upsample_kernel[grid](
        star, star_h, star_w, sums, out_h, out_w, stats, WRITE=write, NEAREST=_interpolation(interpolation), BLOCK=BLOCK
    )
    return sums if write else None


def render(
    star: Tensor,
    out_size: tuple[int, int],
    interpolation: str,
    frames: Tensor | None = None,
    alpha: float = 0.5,
    lut: Tensor | None = None,
    stats: Tensor | None = None,
) -> Tensor:
    """The normalised heatmaps at ``out_size`` (B x H x W) from S*, or, given ``frames`` (B x H x W x 3 uint8
    RGB) and a 256 x 3 uint8 ``lut``, the blended frames. ``stats``: the output's min/max as :func:`upsample`
    reduced them, when already known; else one more launch reduces them here."""
    star = star.contiguous()
    if stats is None:
        stats = torch.full((star.shape[0], 2), float("inf"), dtype=star.dtype, device=star.device)
        stats[:, 1] = float("-inf")  # fills on the device: no host-to-device copy
        upsample(star, stats, out_size, interpolation, write=False)
    out_h, out_w = out_size
    batch, star_h, star_w = star.shape
    nearest = _interpolation(interpolation)
    grid = (triton.cdiv(out_h * out_w, BLOCK), batch)
    if frames is None:
        heat = torch.empty((batch, out_h, out_w), dtype=star.dtype, device=star.device)
        _render_kernel[grid](star, star_h, star_w, out_h, out_w, stats, heat, heat, heat, 0.0,
                             BLEND=False, NEAREST=nearest, BLOCK=BLOCK)
        return heat
    if frames.shape != (batch, out_h, out_w, 3) or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be {batch} x {out_h} x {out_w} x 3 uint8, got {tuple(frames.shape)} {frames.dtype}")
    if lut is None or lut.shape != (256, 3) or lut.dtype != torch.uint8:
        raise ValueError("blending needs a 256 x 3 uint8 colour table")
    frames = frames.contiguous()
    out = torch.empty_like(frames)
    _render_kernel[grid](star, star_h, star_w, out_h, out_w, stats, out, frames, lut.to(star.device).contiguous(),
                         float(alpha), BLEND=True, NEAREST=nearest, BLOCK=BLOCK)
    return out


def weighted_sum(
    groups: Iterable[tuple[tuple[int, int], list[int], Tensor]],
    weights: Tensor,
    out_size: tuple[int, int],
    interpolation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of the torch path's weighted sum and final normalisation, in 3 launches:
    ``(S* at (h*, w*), S at out_size, normalised S)``."""
    star, stats = star_sum(groups, weights, interpolation)
    sums = upsample(star, stats, out_size, interpolation)
    return star, sums, render(star, out_size, interpolation, stats=stats)
