"""The torch path's colour-and-blend (``wcam.kernels.blend``) and its frame-by-frame render, into RGB and
planar YUV frames, against the plain float64 per-value reference (``tests/reference_blend.py``)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from reference_blend import reference_rgb, reference_yuv, yuv_table

from wcam.kernels.blend import blend
from wcam.kernels.dispatch import TorchKernels
from wcam.kernels.frames import YUVFrames, rgb_to_yuv
from wcam.kernels.resample import normalize_maps
from wcam.overlay import TURBO_LUT

LUT = torch.from_numpy(TURBO_LUT.copy())


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
    low, high = reference_rgb(heat.numpy(), frames.numpy(), alpha, TURBO_LUT)
    assert ((got >= low) & (got <= high)).all()
    if alpha in (0.0, 0.5, 1.0):
        assert np.array_equal(got, high)


def test_blend_takes_strided_frames_and_float32_heatmaps():
    """Frames in another memory order and float32 heatmaps (as the engine makes them) give the reference's
    values, into a contiguous output."""
    heat, frames = _inputs(1)
    strided = frames.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, other memory order
    got = blend(heat.float(), strided, 0.35, LUT)
    low, high = reference_rgb(heat.float().double().numpy(), frames.numpy(), 0.35, TURBO_LUT)
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


def _yuv(batch: int, height: int, width: int, chroma: int, seed: int, matrix: str = "bt601") -> YUVFrames:
    gen = torch.Generator().manual_seed(seed)
    size = height * width + 2 * (height // chroma) * (width // chroma)
    return YUVFrames(torch.randint(0, 256, (batch, size), generator=gen, dtype=torch.uint8), height, width, chroma, matrix)


def _planes_of(frames: YUVFrames, b: int) -> list[np.ndarray]:
    return [plane[b, ..., 0].numpy() for plane, _ in frames.planes()]


@pytest.mark.parametrize("chroma", [2, 1])
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize(("alpha", "matrix"), [(0.5, "bt601"), (0.35, "bt709")])
def test_render_into_yuv_frames_matches_the_float64_reference(chroma, interpolation, alpha, matrix):
    """Rendering into planar YUV (4:2:0 and 4:4:4) equals the reference on the rendered heatmaps: luma per
    pixel, 4:2:0 chroma on each 2 x 2 block's mean heat, with the colours converted by the standard's
    equations; a repeated map (video's --every) and an all-zero one included."""
    gen = torch.Generator().manual_seed(4)
    star = torch.rand(3, 5, 7, generator=gen)
    star[1] = star[0]
    star[2] = 0.0
    frames = _yuv(3, 18, 26, chroma, seed=5, matrix=matrix)
    kernels = TorchKernels()
    heat = kernels.render(star, (18, 26), interpolation).double().numpy()
    got = kernels.render(star, (18, 26), interpolation, frames=frames, alpha=alpha, lut=LUT)
    assert isinstance(got, YUVFrames) and got.data.shape == frames.data.shape and got.chroma == chroma
    for b in range(3):
        expected = reference_yuv(heat[b], _planes_of(frames, b), chroma, alpha, TURBO_LUT, matrix)
        for plane, (low, high) in zip(_planes_of(got, b), expected):
            values = plane.astype(np.int64)
            assert ((values >= low) & (values <= high)).all(), b


def test_render_into_yuv_frames_in_place_and_its_errors():
    """``out=frames`` blends in place with the same values; mismatched frames or outputs are refused."""
    gen = torch.Generator().manual_seed(6)
    star = torch.rand(2, 4, 4, generator=gen)
    frames = _yuv(2, 8, 12, 2, seed=7)
    kernels = TorchKernels()
    fresh = kernels.render(star, (8, 12), "bilinear", frames=frames, alpha=0.5, lut=LUT)
    same = frames.like(frames.data.clone())
    assert kernels.render(star, (8, 12), "bilinear", frames=same, alpha=0.5, lut=LUT, out=same) is same
    assert torch.equal(same.data, fresh.data) and not torch.equal(fresh.data, frames.data)
    with pytest.raises(ValueError, match="do not match the heatmaps"):
        kernels.render(star, (8, 14), "bilinear", frames=frames, lut=LUT)
    with pytest.raises(ValueError, match="out must be YUV frames"):
        kernels.render(star, (8, 12), "bilinear", frames=frames, lut=LUT, out=_yuv(2, 8, 12, 1, seed=0).like(torch.zeros(2, 288, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="4:2:0 frames need an even"):
        YUVFrames(torch.zeros(1, 15 * 3, dtype=torch.uint8), 3, 10)
    with pytest.raises(ValueError, match=r"must be uint8 B x 144"):
        YUVFrames(torch.zeros(1, 143, dtype=torch.uint8), 8, 12)
    with pytest.raises(ValueError, match="matrix must be one of"):
        YUVFrames(torch.zeros(1, 144, dtype=torch.uint8), 8, 12, matrix="srgb")


@pytest.mark.parametrize("matrix", ["bt601", "bt709"])
def test_colour_table_in_yuv_matches_the_standard_and_ffmpeg(matrix):
    """The Turbo table in YUV equals the standard's equations (to 1e-9) and FFmpeg's own RGB -> YUV conversion
    (swscale, accurate rounding) to within its rounding: half a level, plus its 15-bit fixed-point
    coefficients (measured: 0.53 levels at most, BT.601)."""
    ours = rgb_to_yuv(torch.from_numpy(TURBO_LUT.astype(np.float64) / 255.0), matrix, full_range=False).numpy()
    np.testing.assert_allclose(ours, yuv_table(TURBO_LUT, matrix), rtol=0, atol=1e-9)
    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.repeat(TURBO_LUT[None], 2, axis=0)), format="rgb24")
    from av.video.reformatter import Interpolation

    space = {"bt601": "ITU601", "bt709": "ITU709"}[matrix]
    converted = image.reformat(format="yuv444p", dst_colorspace=space, interpolation=Interpolation.POINT | Interpolation.ACCURATE_RND)
    ffmpeg = converted.to_ndarray()[:, 0, :].T.astype(np.float64)  # 256 x 3
    assert np.abs(ffmpeg - ours).max() <= 0.6
