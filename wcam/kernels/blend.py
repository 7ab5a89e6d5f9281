"""Colour a normalised heatmap with a lookup table and blend it into uint8 frames (torch path).

Frames are planes (:mod:`wcam.kernels.frames`): an RGB frame is one plane of three channels, a YUV frame a
luma and two chroma planes, which may be half size. Every output value is a function of (colour index,
channel, input value), 256 x C x 256 cases per plane, so the formula is evaluated once into a table and
each value is one gather. The gathers, and the colour indices before them, run over bands of rows that
stay in the CPU's cache (1 MB of int32 index: at 1080p on the 2-core CPU, the fastest of 128 KB to 4 MB,
and 2.5x faster than one index for the whole frame, itself several times faster than arithmetic per
value).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from wcam.kernels.frames import Plane, frame_planes

BAND = 1 << 18  # values per band


def blend(heatmaps: Tensor, frames: Tensor, alpha: float, lut: Tensor) -> Tensor:
    """``round((1 - alpha) frame + alpha lut[round(255 h)])`` per pixel, for ``B x H x W`` heatmaps in [0, 1]
    and ``B x H x W x 3`` uint8 RGB frames; values outside [0, 1] are clipped and NaN counts as 0. Rounding
    is half up, in float32, as in the Triton kernel."""
    check_frames(frames, tuple(heatmaps.shape))
    out = torch.empty(frames.shape, dtype=torch.uint8, device=frames.device)
    planes, colours = frame_planes(frames, lut)
    blend_each(lambda i: heatmaps[i], [False] * len(frames), planes, colours, alpha, [out])
    return out


def blend_each(
    heatmap: Callable[[int], Tensor],
    repeated: Sequence[bool],
    planes: Sequence[Plane],
    colours: Sequence[Tensor],
    alpha: float,
    out: Sequence[Tensor],
) -> None:
    """Blend into ``out`` (one tensor per plane, shaped as it, each image's plane contiguous) frame by frame:
    frame ``i``'s ``H x W`` heatmap is asked of ``heatmap(i)`` only when that frame is blended, and not at
    all when ``repeated[i]`` says it is the previous frame's (video's ``--every``: that frame's colour
    indices are used again), so that a batch of 1080p frames never holds more than one full-size map, which
    ``heatmap`` may write into one reused buffer.

    Plane ``k`` (``B x h x w x C`` uint8, step 1 or 2) gets ``round((1 - alpha) v + alpha colours[k][j, c])``,
    ``j = round(255 clip(g))`` with ``g`` the heatmap (step 1) or its mean over each 2 x 2 block (step 2).
    Every buffer is made once per call: on this CPU a fresh 8 MB tensor per frame costs more in page faults
    than the arithmetic on it.
    """
    device = planes[0][0].device
    tables = [_table(colour.to(device), alpha) for colour in colours]
    indices: dict[tuple[int, int], Tensor] = {}  # (step, channels): the current map's colour index x 256 C
    scratch = torch.empty(2 * BAND + 8 * max(plane.shape[2] for plane, _ in planes), dtype=torch.float32, device=device)
    buffer = torch.empty(BAND + max(plane.shape[2] * plane.shape[3] for plane, _ in planes), dtype=torch.int32, device=device)
    for plane, step in planes:  # one index per plane size and channel count (a YUV frame's U and V share one)
        indices.setdefault((step, plane.shape[-1]), torch.empty(plane.shape[1:3], dtype=torch.int32, device=device))
    for i in range(planes[0][0].shape[0]):
        if not repeated[i]:
            heat = heatmap(i)
            for (step, channels), index in indices.items():
                colour_index(heat, step, 256 * channels, index, scratch)
        for (plane, step), table, target in zip(planes, tables, out):
            _gather(indices[(step, plane.shape[-1])], plane[i], table, target[i], buffer)


def colour_index(heat: Tensor, step: int, scale: int, out: Tensor, scratch: Tensor) -> None:
    """``out = scale * round(255 clip(g))`` (int32; half up, in float32; NaN counts as 0), ``g`` the ``H x W``
    heatmap, or with ``step`` 2 its mean over each 2 x 2 block (``out`` is ``H/2 x W/2``); in bands of rows
    through ``scratch`` (float32, at least ``2 BAND`` + 8 rows of ``out``)."""
    rows = max(1, BAND // (out.shape[1] * step * step))
    for top in range(0, out.shape[0], rows):
        band = out[top : top + rows]
        source = heat[top * step : (top + band.shape[0]) * step]
        values = scratch[: source.numel()].view(source.shape).copy_(source)
        if step == 2:  # the 2 x 2 mean, summed in avg_pool2d's order (strided adds: 15x faster than it here)
            quads = values.view(band.shape[0], 2, band.shape[1], 2)
            values = torch.add(quads[:, 0, :, 0], quads[:, 0, :, 1], out=scratch[-band.numel() :].view(band.shape))
            values.add_(quads[:, 1, :, 0]).add_(quads[:, 1, :, 1]).mul_(0.25)
        values.nan_to_num_(nan=0.0).clamp_(0.0, 1.0).mul_(255.0).add_(0.5)
        band.copy_(values).mul_(scale)  # float to int: truncation, i.e. floor of these non-negative values


def _table(colour: Tensor, alpha: float) -> Tensor:
    """The flat uint8 table ``[colour index, channel, value]`` of ``round((1 - alpha) value + alpha colour)``
    for a ``256 x C`` float32 colour table."""
    channels = colour.shape[1]
    values = torch.arange(256, dtype=torch.float32, device=colour.device)
    mixed = (1.0 - alpha) * values.view(1, 1, 256) + alpha * colour.view(256, channels, 1) + 0.5
    return mixed.clamp_(0.0, 255.0).to(torch.uint8).view(-1)


def _gather(index: Tensor, plane: Tensor, table: Tensor, out: Tensor, buffer: Tensor) -> None:
    """``out = table[index + 256 c + plane]`` for one ``h x w x C`` plane, ``index`` (``h x w`` int32) already
    scaled by ``256 C``; in bands of rows through ``buffer`` (int32, at least ``BAND`` + one row)."""
    h, w, channels = plane.shape
    rows = max(1, BAND // (w * channels))
    offsets = torch.arange(0, 256 * channels, 256, dtype=torch.int32, device=plane.device)
    for top in range(0, h, rows):
        source = plane[top : top + rows]
        band = buffer[: source.numel()].view(source.shape)
        if channels == 1:
            torch.add(index[top : top + rows].unsqueeze(-1), source, out=band)
        else:
            torch.add(index[top : top + rows].unsqueeze(-1), offsets, out=band).add_(source)
        torch.index_select(table, 0, band.view(-1), out=out[top : top + rows].view(-1))


def check_frames(frames: Tensor, shape: tuple[int, ...]) -> None:
    """Refuse frames that are not uint8 ``shape x 3`` (``shape`` = the heatmaps' B x H x W)."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or tuple(frames.shape[:3]) != shape:
        raise ValueError(
            f"frames must be uint8 {' x '.join(map(str, shape))} x 3 to match the heatmaps, "
            f"got {frames.dtype} {tuple(frames.shape)}"
        )
