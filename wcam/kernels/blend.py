"""Colour a normalised heatmap with a lookup table and blend it into uint8 RGB frames (torch path)."""

from __future__ import annotations

import torch
from torch import Tensor


def blend(heatmaps: Tensor, frames: Tensor, alpha: float, lut: Tensor) -> Tensor:
    """``round((1 - alpha) frame + alpha lut[round(255 h)])`` per pixel, for ``B x H x W`` heatmaps in [0, 1]
    and ``B x H x W x 3`` uint8 frames; values outside [0, 1] are clipped and NaN counts as 0. Rounding is
    half up, in float32, as in the Triton kernel.

    Every output value is a function of (colour index, channel, frame value), 256 x 3 x 256 cases, so the
    formula is evaluated once into a table and each pixel is one gather: at 1080p this is several times
    faster than the arithmetic per pixel.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[:3] != heatmaps.shape:
        raise ValueError(
            f"frames must be uint8 {' x '.join(map(str, heatmaps.shape))} x 3 to match the heatmaps, "
            f"got {frames.dtype} {tuple(frames.shape)}"
        )
    device = frames.device
    colour = lut.to(device).float()  # 256 x 3
    values = torch.arange(256, dtype=torch.float32, device=device)
    mixed = (1.0 - alpha) * values.view(1, 1, 256) + alpha * colour.view(256, 3, 1) + 0.5
    table = mixed.clamp_(0.0, 255.0).to(torch.uint8).view(-1)  # [colour index, channel, frame value]
    heat = torch.nan_to_num(heatmaps.float(), nan=0.0).clamp_(0.0, 1.0)
    index = (heat.mul_(255.0).add_(0.5).to(torch.int32).mul_(768)).unsqueeze(-1)
    index = index + torch.arange(0, 768, 256, dtype=torch.int32, device=device) + frames.to(torch.int32)
    return table.index_select(0, index.view(-1)).view(index.shape)
