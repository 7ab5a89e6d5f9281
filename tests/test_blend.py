"""The torch path's colour-and-blend (``wcam.kernels.blend``) and its frame-by-frame render, against a plain
float64 per-pixel reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wcam.kernels.blend import blend
from wcam.kernels.dispatch import TorchKernels
from wcam.kernels.resample import normalize_maps, resample
from wcam.overlay import TURBO_LUT

LUT = torch.from_numpy(TURBO_LUT.copy())


def _reference_blend(heat: np.ndarray, frames: np.ndarray, alpha: float) -> np.ndarray:
    """``floor((1 - alpha) f + alpha lut[floor(255 clip(h) + 0.5)] + 0.5)`` pixel by pixel, in float64; NaN as 0."""
    out = np.empty_like(frames)
    for b, y, x in np.ndindex(*heat.shape):
        value = heat[b, y, x]
        value = 0.0 if math.isnan(value) else min(max(float(value), 0.0), 1.0)
        colour = TURBO_LUT[int(math.floor(255.0 * value + 0.5))]
        for c in range(3):
            mixed = (1.0 - alpha) * float(frames[b, y, x, c]) + alpha * float(colour[c]) + 0.5
            out[b, y, x, c] = min(max(math.floor(mixed), 0), 255)
    return out


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    heat = torch.rand(3, 13, 17, generator=gen, dtype=torch.float64) * 1.4 - 0.2  # some values outside [0, 1]
    heat[0, 2, 3] = float("nan")
    frames = torch.randint(0, 256, (3, 13, 17, 3), generator=gen, dtype=torch.uint8)
    return heat, frames


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.35, 1.0])
def test_blend_matches_the_float64_reference(alpha):
    """Exact at alpha 0, 1/2 and 1, where the float32 formula has no rounding error before the final floor;
    at 0.35, float32 and float64 may round differently where a value lies within ~1e-5 of a half level, so up
    to 1 level in at most 1% of values (measured here: none)."""
    heat, frames = _inputs(0)
    got = blend(heat, frames, alpha, LUT).numpy()
    expected = _reference_blend(heat.numpy(), frames.numpy(), alpha)
    diff = np.abs(got.astype(int) - expected.astype(int))
    if alpha in (0.0, 0.5, 1.0):
        assert np.array_equal(got, expected)
    else:
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


def test_blend_takes_strided_frames_and_a_batch_equals_its_frames():
    heat, frames = _inputs(1)
    strided = frames.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, other memory order
    whole = blend(heat, strided, 0.35, LUT)
    assert whole.is_contiguous() and torch.equal(whole, blend(heat, frames, 0.35, LUT))
    for i in range(len(frames)):
        assert torch.equal(whole[i : i + 1], blend(heat[i : i + 1], frames[i : i + 1], 0.35, LUT))


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_render_into_frames_equals_blending_the_rendered_heatmaps(interpolation):
    """The frame-by-frame render (one full-size map at a time) gives what rendering the heatmaps for the whole
    batch and then blending them gives."""
    gen = torch.Generator().manual_seed(2)
    star = torch.rand(3, 5, 7, generator=gen)
    star[1] = 0.0  # an all-zero sum (no layer lit up): heatmap 0 everywhere
    frames = torch.randint(0, 256, (3, 21, 30, 3), generator=gen, dtype=torch.uint8)
    kernels = TorchKernels()
    heat = kernels.render(star, (21, 30), interpolation)
    torch.testing.assert_close(heat, normalize_maps(resample(star, (21, 30), interpolation)), rtol=0, atol=0)
    assert float(heat[1].abs().max()) == 0.0
    got = kernels.render(star, (21, 30), interpolation, frames=frames, alpha=0.5, lut=LUT)
    assert torch.equal(got, blend(heat, frames, 0.5, LUT))
    with pytest.raises(ValueError, match="frames must be uint8 3 x 21 x 30 x 3"):
        kernels.render(star, (21, 30), interpolation, frames=frames[:, :20], lut=LUT)


def test_normalize_maps_constant_and_nan_maps_become_zeros():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]], [[1.0, float("nan")], [0.0, 1.0]]])
    out = normalize_maps(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]), rtol=0, atol=0)
    assert float(out[1:].abs().max()) == 0.0
