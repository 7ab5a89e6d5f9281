"""The torch path's colour-and-blend (``wcam.kernels.blend``) and its frame-by-frame render, against a plain
float64 per-pixel reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wcam.kernels.blend import blend
from wcam.kernels.dispatch import TorchKernels
from wcam.kernels.resample import normalize_maps
from wcam.overlay import TURBO_LUT

LUT = torch.from_numpy(TURBO_LUT.copy())


def _reference_blend(heat: np.ndarray, frames: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``floor((1 - alpha) f + alpha lut[floor(255 clip(h) + 0.5)] + 0.5)`` pixel by pixel, in float64; NaN as 0.

    Returns the lowest and highest acceptable value: they differ only where ``(1 - alpha) f + alpha c`` lies
    within 1e-4 of a half level, where float32 arithmetic (the implementation's) may round either way
    (with alpha = 0.35 the exact value is ``(13 f + 7 c) / 20``, a half level for 1 in 20 pairs)."""
    low = np.empty(frames.shape, dtype=np.int64)
    high = np.empty(frames.shape, dtype=np.int64)
    for b, y, x in np.ndindex(*heat.shape):
        value = heat[b, y, x]
        value = 0.0 if math.isnan(value) else min(max(float(value), 0.0), 1.0)
        colour = TURBO_LUT[int(math.floor(255.0 * value + 0.5))]
        for c in range(3):
            mixed = (1.0 - alpha) * float(frames[b, y, x, c]) + alpha * float(colour[c])
            low[b, y, x, c] = math.floor(mixed + 0.5 - 1e-4)
            high[b, y, x, c] = math.floor(mixed + 0.5 + 1e-4)
    return low, high


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    heat = torch.rand(3, 13, 17, generator=gen, dtype=torch.float64) * 1.4 - 0.2  # some values outside [0, 1]
    heat[0, 2, 3] = float("nan")
    frames = torch.randint(0, 256, (3, 13, 17, 3), generator=gen, dtype=torch.uint8)
    return heat, frames


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.35, 0.7, 1.0])
def test_blend_matches_the_float64_reference(alpha):
    """Exact, except at values within 1e-4 of a half level (see the reference); at alpha 0, 1/2 and 1 the
    float32 formula has no rounding error before the final floor, so there every tie is exact and rounds up."""
    heat, frames = _inputs(0)
    got = blend(heat, frames, alpha, LUT).numpy().astype(np.int64)
    low, high = _reference_blend(heat.numpy(), frames.numpy(), alpha)
    assert ((got >= low) & (got <= high)).all()
    if alpha in (0.0, 0.5, 1.0):
        assert np.array_equal(got, high)


def test_blend_takes_strided_frames_and_float32_heatmaps():
    """Frames in another memory order and float32 heatmaps (as the engine makes them) give the reference's
    values, into a contiguous output."""
    heat, frames = _inputs(1)
    strided = frames.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, other memory order
    got = blend(heat.float(), strided, 0.35, LUT)
    low, high = _reference_blend(heat.float().double().numpy(), frames.numpy(), 0.35)
    assert got.is_contiguous()
    values = got.numpy().astype(np.int64)
    assert ((values >= low) & (values <= high)).all()


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_render_into_frames_equals_blending_the_rendered_heatmaps(interpolation):
    """The frame-by-frame render (one full-size map at a time, reused for a repeated map) gives what rendering
    the heatmaps for the whole batch and then blending them gives."""
    gen = torch.Generator().manual_seed(2)
    star = torch.rand(4, 5, 7, generator=gen)
    star[1] = 0.0  # an all-zero sum (no layer lit up): heatmap 0 everywhere
    star[3] = star[2]  # video's --every: two frames, one map
    frames = torch.randint(0, 256, (4, 21, 30, 3), generator=gen, dtype=torch.uint8)
    kernels = TorchKernels()
    heat = kernels.render(star, (21, 30), interpolation)
    assert float(heat[1].abs().max()) == 0.0
    got = kernels.render(star, (21, 30), interpolation, frames=frames, alpha=0.5, lut=LUT)
    assert torch.equal(got, blend(heat, frames, 0.5, LUT))
    with pytest.raises(ValueError, match="frames must be uint8 4 x 21 x 30 x 3"):
        kernels.render(star, (21, 30), interpolation, frames=frames[:, :20], lut=LUT)


def test_normalize_maps_constant_and_nan_maps_become_zeros():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]], [[1.0, float("nan")], [0.0, 1.0]]])
    out = normalize_maps(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]), rtol=0, atol=0)
    assert float(out[1:].abs().max()) == 0.0
    torch.testing.assert_close(normalize_maps(torch.tensor([[[0, 2], [4, 8]]])), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
