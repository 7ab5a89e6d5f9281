"""Independent float64 reference for colouring heatmaps and blending them into frames, value by value in
plain Python loops: RGB pixels, and planar YUV (4:4:4 and 4:2:0) with the colour table converted by the
BT.601 / BT.709 equations as the standards print them (not by wcam's code).

Each function returns the lowest and highest acceptable value of every output value: they differ only where
the exact blend ``(1 - alpha) v + alpha c`` lies within ``slack`` of a half level, where float32 arithmetic
(the implementations') may round either way (with alpha = 0.35 the exact value is ``(13 v + 7 c) / 20``, a
half level for 1 in 20 pairs).
"""

from __future__ import annotations

import math

import numpy as np

# Y' = kr R + kg G + kb B; Pb = (B - Y') / db; Pr = (R - Y') / dr (ITU-R BT.601-7 and BT.709-6, section 3)
_EQUATIONS = {
    "bt601": (0.299, 0.587, 0.114, 1.772, 1.402),
    "bt709": (0.2126, 0.7152, 0.0722, 1.8556, 1.5748),
}


def colour_index(value: float) -> int:
    """``floor(255 clip(value) + 0.5)``, NaN as 0."""
    value = 0.0 if math.isnan(value) else min(max(float(value), 0.0), 1.0)
    return int(math.floor(255.0 * value + 0.5))


def _bounds(mixed: float, slack: float) -> tuple[int, int]:
    return math.floor(mixed + 0.5 - slack), math.floor(mixed + 0.5 + slack)


def reference_rgb(heat: np.ndarray, frames: np.ndarray, alpha: float, lut: np.ndarray, slack: float = 1e-4):
    """``floor((1 - alpha) f + alpha lut[colour_index(h)] + 0.5)`` for ``B x H x W`` heatmaps and
    ``B x H x W x 3`` frames: ``(low, high)``, int64 arrays shaped as the frames."""
    low = np.empty(frames.shape, dtype=np.int64)
    high = np.empty(frames.shape, dtype=np.int64)
    for b, y, x in np.ndindex(*heat.shape):
        colour = lut[colour_index(heat[b, y, x])]
        for c in range(3):
            low[b, y, x, c], high[b, y, x, c] = _bounds((1.0 - alpha) * float(frames[b, y, x, c]) + alpha * float(colour[c]), slack)
    return low, high


def yuv_table(lut: np.ndarray, matrix: str = "bt601") -> np.ndarray:
    """The 256 x 3 RGB colour table as limited-range Y, Cb, Cr code values (float64, unrounded):
    ``Y = 16 + 219 Y'``, ``C = 128 + 224 P``."""
    kr, kg, kb, db, dr = _EQUATIONS[matrix]
    table = np.empty((256, 3))
    for i, (r, g, b) in enumerate(lut.astype(np.float64) / 255.0):
        luma = kr * r + kg * g + kb * b
        table[i] = (16.0 + 219.0 * luma, 128.0 + 224.0 * (b - luma) / db, 128.0 + 224.0 * (r - luma) / dr)
    return table


def reference_yuv(heat: np.ndarray, planes: list[np.ndarray], chroma: int, alpha: float, lut: np.ndarray,
                  matrix: str = "bt601", slack: float = 1e-4):
    """One frame's Y, U and V planes (``H x W``, then two ``H/chroma x W/chroma``) blended with the ``H x W``
    heatmap: plane k's value at (i, j) is ``floor((1 - alpha) v + alpha table[colour_index(g), k] + 0.5)``,
    ``g`` the heatmap there, or on 4:2:0 chroma planes the mean of its 2 x 2 block. ``[(low, high)]`` per plane."""
    table = yuv_table(lut, matrix)
    out = []
    for k, plane in enumerate(planes):
        step = 1 if k == 0 else chroma
        low = np.empty(plane.shape, dtype=np.int64)
        high = np.empty(plane.shape, dtype=np.int64)
        for i, j in np.ndindex(*plane.shape):
            g = float(np.mean(heat[step * i : step * i + step, step * j : step * j + step]))
            low[i, j], high[i, j] = _bounds((1.0 - alpha) * float(plane[i, j]) + alpha * table[colour_index(g), k], slack)
        out.append((low, high))
    return out
