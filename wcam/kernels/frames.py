"""Frames as the blend sees them: uint8 planes of interleaved channels, each with the heatmap's colours in
its own terms.

An RGB frame (``B x H x W x 3``) is one plane of three channels. A planar YUV frame, as video decoders
produce and H.264 encoders take it, is a full-size luma plane and two chroma planes at full size (4:4:4) or
half size in both directions (4:2:0). Blending in YUV is blending in RGB (the conversion is affine) without
two colour conversions per frame and with half the values at 4:2:0, which is what makes 1080p video cheap
to draw on a CPU. On a half-size plane each value covers a 2 x 2 block of frame pixels, and the heatmap is
averaged over that block before it is coloured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# (Kr, Kb) of each YCbCr matrix: Y' = Kr R + (1 - Kr - Kb) G + Kb B, Cb = (B - Y') / (2 (1 - Kb)),
# Cr = (R - Y') / (2 (1 - Kr)) (ITU-T H.273), the ones FFmpeg's swscale converts with.
MATRICES: dict[str, tuple[float, float]] = {
    "bt601": (0.299, 0.114),
    "bt709": (0.2126, 0.0722),
    "fcc": (0.30, 0.11),
    "smpte240m": (0.212, 0.087),
    "bt2020": (0.2627, 0.0593),
}

Plane = tuple[Tensor, int]  # B x h x w x C uint8 values, and the step: 1 (full size) or 2 (half size)


@dataclass(frozen=True)
class YUVFrames:
    """A batch of planar YUV frames: ``data`` is ``B x n`` uint8, each row the Y, U and V planes one after the
    other (``n = H W + 2 (H / chroma) (W / chroma)``: the byte order of FFmpeg's yuv420p / yuv444p, which is
    PyAV's ``to_ndarray`` flattened); ``chroma`` is 1 (4:4:4) or 2 (4:2:0, even H and W);
    ``matrix`` one of :data:`MATRICES`; ``full_range``: values span 0-255 (JPEG) instead of 16-235/240."""

    data: Tensor
    height: int
    width: int
    chroma: int = 2
    matrix: str = "bt601"
    full_range: bool = False

    def __post_init__(self) -> None:
        if self.chroma not in (1, 2):
            raise ValueError(f"chroma subsampling must be 1 (4:4:4) or 2 (4:2:0), got {self.chroma}")
        if self.chroma == 2 and (self.height % 2 or self.width % 2):
            raise ValueError(f"4:2:0 frames need an even height and width, got {self.height} x {self.width}")
        if self.matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {tuple(MATRICES)}, got {self.matrix!r}")
        size = self.height * self.width + 2 * (self.height // self.chroma) * (self.width // self.chroma)
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] != size:
            raise ValueError(
                f"YUV frames of {self.height} x {self.width} (chroma step {self.chroma}) must be uint8 B x {size}, "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, H, W)``: the heatmaps' shape that blends into these frames."""
        return (self.data.shape[0], self.height, self.width)

    def planes(self) -> list[Plane]:
        """Views of the Y, U and V planes, ``B x h x w x 1`` each, with their steps."""
        batch, h, w = self.shape
        ch, cw = h // self.chroma, w // self.chroma
        y = self.data[:, : h * w].view(batch, h, w, 1)
        u = self.data[:, h * w : h * w + ch * cw].view(batch, ch, cw, 1)
        v = self.data[:, h * w + ch * cw :].view(batch, ch, cw, 1)
        return [(y, 1), (u, self.chroma), (v, self.chroma)]

    def colours(self, lut: Tensor) -> list[Tensor]:
        """The RGB colour table ``lut`` (256 x 3 uint8) in this matrix and range: one ``256 x 1`` float32 table
        per plane (not rounded: the blend rounds once, after mixing)."""
        yuv = rgb_to_yuv(lut.double() / 255.0, self.matrix, self.full_range)
        return [yuv[:, k : k + 1].float() for k in range(3)]

    def like(self, data: Tensor) -> "YUVFrames":
        """These frames' layout and colours around other values (a blend's output)."""
        return YUVFrames(data, self.height, self.width, self.chroma, self.matrix, self.full_range)


def rgb_to_yuv(rgb: Tensor, matrix: str, full_range: bool) -> Tensor:
    """``... x 3`` RGB in [0, 1] to ``... x 3`` Y, U, V code values (float, unrounded): limited range
    ``16 + 219 Y'``, ``128 + 224 C``; full range ``255 Y'``, ``128 + 255 C``."""
    kr, kb = MATRICES[matrix]
    r, g, b = rgb.unbind(-1)
    luma = kr * r + (1.0 - kr - kb) * g + kb * b
    cb = (b - luma) / (2.0 * (1.0 - kb))
    cr = (r - luma) / (2.0 * (1.0 - kr))
    if full_range:
        return torch.stack([255.0 * luma, 128.0 + 255.0 * cb, 128.0 + 255.0 * cr], dim=-1)
    return torch.stack([16.0 + 219.0 * luma, 128.0 + 224.0 * cb, 128.0 + 224.0 * cr], dim=-1)


def frame_planes(frames: Tensor | YUVFrames, lut: Tensor) -> tuple[list[Plane], list[Tensor]]:
    """``(planes, colours)`` of RGB (``B x H x W x 3`` uint8: one plane, the table itself) or YUV frames."""
    if isinstance(frames, YUVFrames):
        return frames.planes(), frames.colours(lut)
    return [(frames, 1)], [lut.float()]
