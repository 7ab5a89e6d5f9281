"""Colour a normalised heatmap with a lookup table and blend it into uint8 RGB frames (torch path)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def blend(heatmaps: Tensor, frames: Tensor, alpha: float, lut: Tensor) -> Tensor:
    """``round((1 - alpha) frame + alpha lut[round(255 h)])`` per pixel, for ``B x H x W`` heatmaps in [0, 1]
    and ``B x H x W x 3`` uint8 frames; values outside [0, 1] are clipped and NaN counts as 0. Rounding is
    half up, in float32, as in the Triton kernel."""
    check_frames(frames, tuple(heatmaps.shape))
    return blend_each(lambda i: heatmaps[i], frames, alpha, lut)


def blend_each(heatmap: Callable[[int], Tensor], frames: Tensor, alpha: float, lut: Tensor) -> Tensor:
    """:func:`blend` with the ``H x W`` heatmap of frame ``i`` made by ``heatmap(i)`` only when that frame is
    blended, so that a batch of 1080p frames never holds more than one full-size float map; when ``heatmap``
    returns the very tensor it returned for the frame before, that frame's colour indices are reused.

    Every output value is a function of (colour index, channel, frame value), 256 x 3 x 256 cases, so the
    formula is evaluated once into a table and each pixel is one gather, through an index buffer reused from
    frame to frame: measured at 1080p on the 2-core CPU, 2.5x faster than the same gather over the whole
    batch at once (whose B x H x W x 3 int32 index is 200 MB at batch 8) and several times faster than the
    arithmetic per pixel.
    """
    device = frames.device
    colour = lut.to(device).float()  # 256 x 3
    values = torch.arange(256, dtype=torch.float32, device=device)
    mixed = (1.0 - alpha) * values.view(1, 1, 256) + alpha * colour.view(256, 3, 1) + 0.5
    table = mixed.clamp_(0.0, 255.0).to(torch.uint8).view(-1)  # [colour index, channel, frame value]
    channel = torch.arange(0, 768, 256, dtype=torch.int32, device=device)
    out = torch.empty(frames.shape, dtype=torch.uint8, device=device)
    index = torch.empty(frames.shape[1:], dtype=torch.int32, device=device)
    last: tuple[Tensor, Tensor] | None = None  # (heatmap, its colour index)
    for i in range(frames.shape[0]):
        heat = heatmap(i)
        if last is None or heat is not last[0]:  # the same map again (video's --every): its colours again
            clipped = torch.nan_to_num(heat.float(), nan=0.0).clamp_(0.0, 1.0)
            last = (heat, clipped.mul_(255.0).add_(0.5).to(torch.int32).mul_(768))  # 768 x round(255 h), half up
        torch.add(last[1].unsqueeze(-1), channel, out=index).add_(frames[i])
        torch.index_select(table, 0, index.view(-1), out=out[i].view(-1))
    return out


def check_frames(frames: Tensor, shape: tuple[int, ...]) -> None:
    """Refuse frames that are not uint8 ``shape x 3`` (``shape`` = the heatmaps' B x H x W)."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or tuple(frames.shape[:3]) != shape:
        raise ValueError(
            f"frames must be uint8 {' x '.join(map(str, shape))} x 3 to match the heatmaps, "
            f"got {frames.dtype} {tuple(frames.shape)}"
        )
