"""Heatmap colouring and blending over photos (no matplotlib); the blend itself is :func:`wcam.kernels.blend.blend`.

The colormap is Google's "Turbo" (Mikhailov, 2019), evaluated from Ruofei Du's published degree-5
polynomial approximation (Apache-2.0) into a 256-entry uint8 lookup table: perceptually smoother than
jet, dark blue for 0 and dark red for 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wcam.kernels.blend import blend

# Turbo polynomial coefficients for x^0..x^5, one row per channel (R, G, B).
_TURBO_COEFFS = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ],
    dtype=np.float64,
)


def _turbo_lut() -> np.ndarray:
    """The 256 x 3 uint8 Turbo table: the polynomial at x = i / 255, clipped to [0, 1]."""
    x = np.linspace(0.0, 1.0, 256)
    powers = x[:, None] ** np.arange(6)[None, :]  # 256 x 6
    rgb = np.clip(powers @ _TURBO_COEFFS.T, 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


TURBO_LUT: np.ndarray = _turbo_lut()
TURBO_LUT.setflags(write=False)


def _as_heatmap(heatmap: Any) -> np.ndarray:
    """A 2-D float64 numpy copy of a numpy array or torch tensor (detached, on the CPU)."""
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().cpu().numpy()
    array = np.asarray(heatmap, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H x W), got shape {array.shape}")
    return array


def colorize(heatmap: Any) -> np.ndarray:
    """Map an ``H x W`` heatmap in [0, 1] to ``H x W x 3`` uint8 RGB with the Turbo colormap.

    Values outside [0, 1] are clipped and NaN is treated as 0, so a stray value never breaks a picture.
    """
    values = np.nan_to_num(_as_heatmap(heatmap), nan=0.0, posinf=1.0, neginf=0.0)
    index = np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.intp)  # half up, as the kernels
    return TURBO_LUT[index]


def overlay(image: np.ndarray, heatmap: Any, alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend the coloured heatmap over an ``H x W x 3`` uint8 RGB image: ``(1-alpha)*image + alpha*colour``.

    ``alpha`` = 0 returns the image, 1 the colormap alone. The heatmap must have the image's height and width.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an H x W x 3 uint8 numpy array, got {described}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    heat = _as_heatmap(heatmap)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heatmap shape {heat.shape} does not match the image's height x width {image.shape[:2]}")
    frames = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0)
    return blend(torch.from_numpy(heat).unsqueeze(0), frames, float(alpha), torch.from_numpy(TURBO_LUT.copy()))[0].numpy()
