"""Resample, weight, sum and normalise every layer map in three launches (spec steps 9-10), optionally
blending the coloured heatmap into the frame.

1. ``_star_kernel``, one program per (image, block of pixels at the largest layer size (h*, w*)):
   ``S*[b, y, x] = sum_l w[b, l] R_l(y, x)``, with R_l layer l's normalised map resampled from (h_l, w_l);
   layers of weight 0 are skipped. No (L x h* x w*) stack is ever written.
2. ``_upsample_kernel``, one program per (image, block of output pixels): ``S = R(S*)`` at the output size
   (which may be a 1920 x 1080 frame), optionally written, and its per-image min and max (atomics).
3. ``_render_kernel``: resamples S* again (cheaper than reading S back) and writes
   ``(S - min S) / (max S - min S)`` (0 for a constant map); or ``_blend_kernel``, one launch per plane of
   the frames (one for RGB, three for YUV): the colour of that value blended into the uint8 plane,
   ``round((1 - alpha) value + alpha colour)``, the heatmap averaged over 2 x 2 blocks on half-size planes.

R is torch's ``interpolate``: bilinear with align_corners=False (source ``max((i + 0.5) in / out - 0.5, 0)``,
computed in the maps' dtype) or nearest (``min(floor(i * (in / out)), in - 1)`` in fp32), so the results
equal the torch path's to rounding.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

import triton
import triton.language as tl

from wcam.kernels.resample import INTERPOLATIONS
from wcam.kernels.triton.ieee import divide, min_max_scaled
from wcam.kernels.triton.tables import upload

BLOCK = 256


@triton.jit
def _sample(src, h, w, y, x, out_h, out_w, m, NEAREST: tl.constexpr):
    """Values of the h x w map at ``src`` resampled to out_h x out_w, at output pixels (y, x)."""
    # the scales are divided with IEEE rounding, as torch divides them on the host (see wcam.kernels.triton.ieee)
    if NEAREST:
        sy = tl.minimum((y.to(tl.float32) * divide(h.to(tl.float32), out_h.to(tl.float32))).to(tl.int64), h - 1)
        sx = tl.minimum((x.to(tl.float32) * divide(w.to(tl.float32), out_w.to(tl.float32))).to(tl.int64), w - 1)
        value = tl.load(src + sy * w + sx, mask=m, other=0.0)
    else:
        acc = src.dtype.element_ty
        fy = tl.maximum((y.to(acc) + 0.5) * divide(h.to(acc), out_h.to(acc)) - 0.5, 0.0)
        fx = tl.maximum((x.to(acc) + 0.5) * divide(w.to(acc), out_w.to(acc)) - 0.5, 0.0)
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
    # relaxed: only atomicity is needed here, the next launch reads the result (acq_rel would fence each one)
    tl.atomic_min(stats + 2 * b, tl.min(tl.where(m, v, float("inf")), axis=0), sem="relaxed")
    tl.atomic_max(stats + 2 * b + 1, tl.max(tl.where(m, v, float("-inf")), axis=0), sem="relaxed")


@triton.jit(do_not_specialize=["star_h", "star_w", "out_h", "out_w"])
def _render_kernel(star, star_h, star_w, out_h, out_w, stats, heat, NEAREST: tl.constexpr, BLOCK: tl.constexpr):
    """The normalised heatmap on the program's output pixels."""
    b, pix, m, v = _output_tile(star, star_h, star_w, out_h, out_w, NEAREST, BLOCK)
    tl.store(heat + b * out_h * out_w + pix, _normalised(v, stats, b), mask=m)


@triton.jit
def _normalised(v, stats, b):
    """``(v - min) / (max - min)`` with image b's min and max, 0 for a constant map."""
    low = tl.load(stats + 2 * b)
    spread = tl.load(stats + 2 * b + 1) - low
    return min_max_scaled(v, low, spread)


@triton.jit(do_not_specialize=["star_h", "star_w", "out_h", "out_w", "plane_h", "plane_w", "src_stride", "dst_stride", "alpha"])
def _blend_kernel(star, star_h, star_w, out_h, out_w, stats, src, src_stride, dst, dst_stride, plane_h, plane_w, colours, alpha,
                  CHANNELS: tl.constexpr, STEP: tl.constexpr, NEAREST: tl.constexpr, BLOCK: tl.constexpr):
    """One plane of the frames (``plane_h x plane_w x CHANNELS`` uint8 per image, each image's plane
    contiguous, images ``src_stride`` apart; ``dst`` likewise, ``dst_stride`` apart) with the coloured
    heatmap blended in: ``g`` = the normalised heatmap at the pixel (STEP 1) or its mean over the 2 x 2 block
    of output pixels (STEP 2), colour index ``round(255 clip(g))``, value
    ``round((1 - alpha) v + alpha colours[index, c])``."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = pix < plane_h * plane_w
    y = pix // plane_w
    x = pix % plane_w
    if STEP == 1:
        g = _normalised(_sample(star + b * star_h * star_w, star_h, star_w, y, x, out_h, out_w, m, NEAREST), stats, b)
    else:  # summed in fp32 (as the torch path), in its order: (0, 0), (0, 1), (1, 0), (1, 1)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                v = _sample(star + b * star_h * star_w, star_h, star_w, 2 * y + dy, 2 * x + dx, out_h, out_w, m, NEAREST)
                g += _normalised(v, stats, b).to(tl.float32)
        g = g * 0.25
    index = (tl.minimum(tl.maximum(g.to(tl.float32), 0.0), 1.0) * 255.0 + 0.5).to(tl.int32)
    for c in tl.static_range(CHANNELS):
        colour = tl.load(colours + index * CHANNELS + c, mask=m, other=0.0)
        image = tl.load(src + b * src_stride + pix * CHANNELS + c, mask=m, other=0).to(tl.float32)
        mixed = (1.0 - alpha) * image + alpha * colour + 0.5
        out = tl.minimum(tl.maximum(mixed, 0.0), 255.0).to(tl.uint8)
        tl.store(dst + b * dst_stride + pix * CHANNELS + c, out, mask=m)


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


def render(star: Tensor, out_size: tuple[int, int], interpolation: str, stats: Tensor | None = None) -> Tensor:
    """The normalised heatmaps at ``out_size`` (B x H x W) from S*. ``stats``: the output's min/max as
    :func:`upsample` reduced them, when already known; else one more launch reduces them here."""
    star = star.contiguous()
    stats = _stats(star, out_size, interpolation) if stats is None else stats
    out_h, out_w = out_size
    batch, star_h, star_w = star.shape
    heat = torch.empty((batch, out_h, out_w), dtype=star.dtype, device=star.device)
    grid = (triton.cdiv(out_h * out_w, BLOCK), batch)
    _render_kernel[grid](star, star_h, star_w, out_h, out_w, stats, heat, NEAREST=_interpolation(interpolation), BLOCK=BLOCK)
    return heat


def blend(
    star: Tensor,
    out_size: tuple[int, int],
    interpolation: str,
    planes: Sequence[tuple[Tensor, int]],
    colours: Sequence[Tensor],
    alpha: float,
    out: Sequence[Tensor],
) -> None:
    """The heatmaps rendered from S* at ``out_size`` blended into frames given as planes (``B x h x w x C``
    uint8 and a step of 1 or 2, see :mod:`wcam.kernels.frames`) into ``out``, with ``colours`` (``256 x C``
    float per plane): one launch reduces the min/max, then one per plane."""
    star = star.contiguous()
    stats = _stats(star, out_size, interpolation)
    out_h, out_w = out_size
    batch, star_h, star_w = star.shape
    nearest = _interpolation(interpolation)
    for (plane, step), colour, target in zip(planes, colours, out):
        _, plane_h, plane_w, channels = plane.shape
        if not plane[0].is_contiguous():
            plane = plane.contiguous()
        grid = (triton.cdiv(plane_h * plane_w, BLOCK), batch)
        colour = colour.to(device=star.device, dtype=torch.float32).contiguous()
        _blend_kernel[grid](star, star_h, star_w, out_h, out_w, stats, plane, plane.stride(0), target, target.stride(0),
                            plane_h, plane_w, colour, float(alpha), CHANNELS=channels, STEP=step, NEAREST=nearest, BLOCK=BLOCK)


def _stats(star: Tensor, out_size: tuple[int, int], interpolation: str) -> Tensor:
    """The per-image min and max of R(S*) at ``out_size`` (B x 2), in one launch."""
    stats = torch.full((star.shape[0], 2), float("inf"), dtype=star.dtype, device=star.device)
    stats[:, 1] = float("-inf")  # fills on the device: no host-to-device copy
    upsample(star, stats, out_size, interpolation, write=False)
    return stats


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
