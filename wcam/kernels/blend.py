"""Colour a normalised heatmap with a lookup table and blend it into uint8 RGB frames (torch path)."""

from __future__ import annotations

import torch
from torch import Tensor


def blend(heatmaps: Tensor, frames: Tensor, alpha: float, lut: Tensor) -> Tensor:
    """``round((1 - alpha) frame + alpha lut[round(255 h)])`` per pixel, for ``B x H x W`` heatmaps in [0, 1]
    and ``B x H x W x 3`` uint8 frames; values outside [0, 1] are clipped and NaN counts as 0. Rounding is
    half up, as in the Triton kernel."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[:3] != heatmaps.shape:
        raise ValueError(
            f"frames must be uint8 {' x '.join(map(str, heatmaps.shape))} x 3 to match the heatmaps, "
            f"got {frames.dtype} {tuple(frames.shape)}"
        )
    heat = torch.nan_to_num(heatmaps.float(), nan=0.0).clamp(0.0, 1.0)
    colour = lut.to(frames.device)[(heat * 255.0 + 0.5).long()].float()
    mixed = (1.0 - alpha) * frames.float() + alpha * colour + 0.5
    return mixed.clamp(0.0, 255.0).to(torch.uint8)
