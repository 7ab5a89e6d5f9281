"""The Triton kernels (run by Triton's CPU interpreter here) against the torch path and a float64 reference.

Shapes are small but awkward: non-power-of-two sizes and channel counts (so every block has a masked tail),
1 x 1 maps, a single layer, batch 1 and 3, NCHW and channels-last tensors. Tolerances, per dtype:

- fp64 inputs accumulate in fp64: 1e-12 against the float64 reference (summation order only).
- fp32, fp16 and bf16 inputs accumulate in fp32, and the reference sees the same rounded input values
  (upcast), so the storage dtype adds no error of its own: what remains is fp32 summation over a reduction
  of n = C * h * w terms (channel weights, then the channel sum): ~n * 2^-24 relative to the values summed
  in the worst case, ~sqrt(n) * 2^-24 for rounding errors of random sign (these inputs, and real layers).
  Maps are then min-max normalised, which divides by the spread (O(1) for these random inputs), so the bound
  used is ``8 * sqrt(n) * 2^-24``: 3.2e-5 at the largest n here, against 2.4e-7 measured, and tight enough to
  catch a channel sum accumulated in fp16 (1.2e-3 on the ``single`` set). Scores (one mean per channel,
  then one over channels, accumulated in fp32): 1e-6 against the reference (measured 3.9e-8).
- Resampling and the weighted sum are a few fp32 operations per pixel per layer: 1e-5 for fp32 maps.
- The quantile and weights run in fp64 in the kernel: 1e-12 on fp64 scores, one fp32 rounding (1e-6) on
  fp32 scores.
- Blended uint8 frames: equal to the torch path except where a value lands within rounding of a .5 step,
  so at most 1 apart. On 4:2:0 chroma planes the colour index comes from a 2 x 2 mean of bilinear samples,
  which the kernel and the torch path round differently in the last bit; where that mean lies within it of
  a colour-table step the index, and so the colour, is the neighbouring one: rare (<= 0.5% of values) and
  at most ``ceil(alpha * 13) + 1`` levels (13: the table's largest step in any plane).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import minmax, resize_2d
from reference import winsor_weights as reference_weights

from wcam import Engine
from wcam.kernels.dispatch import TorchKernels, TritonKernels, select_kernels
from wcam.kernels.frames import YUVFrames
from wcam.overlay import TURBO_LUT

TORCH, TRITON = TorchKernels(), TritonKernels()
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (batch, per-layer C x h x w): non-powers of two, 1 x 1 maps, repeated sizes (one group), a single layer
LAYER_SETS = {
    "mixed": (3, [(5, 7, 9), (40, 1, 1), (70, 7, 9), (2, 13, 11), (33, 4, 6)]),
    "single": (1, [(37, 10, 12)]),
    "batch1": (1, [(3, 2, 3), (65, 5, 5), (8, 1, 1)]),
}


def _layers(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Activations and gradients with a positive mean gradient on most layers; layer 2 is channels-last and
    layer 3 a transposed view (no single pixel stride: the kernels copy it)."""
    gen = torch.Generator().manual_seed(seed)
    batch, shapes = LAYER_SETS[name]
    acts, grads = [], []
    for i, (c, h, w) in enumerate(shapes):
        a = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64)
        g = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64) + (0.3 if i % 3 else -0.2)
        a, g = a.to(dtype), g.to(dtype)
        if i == 2:
            a, g = a.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        if i == 3:
            a, g = a.transpose(2, 3), g.transpose(2, 3)
        acts.append(a)
        grads.append(g)
    return acts, grads


def _reference_layer(a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, float]:
    """Spec steps 3-6 for one image and layer, in float64 loops over channels."""
    alpha = [g[k].mean() for k in range(g.shape[0])]
    cam = np.zeros(a.shape[1:])
    for k, weight in enumerate(alpha):
        cam += weight * a[k]
    return minmax(np.maximum(cam, 0.0)), max(float(np.mean(alpha)), 0.0)


def _map_tolerance(dtype: torch.dtype, c: int, h: int, w: int) -> float:
    return 1e-12 if dtype == torch.float64 else 8 * (c * h * w) ** 0.5 * 2.0**-24


def _maps_by_layer(maps) -> dict[int, torch.Tensor]:
    return {i: m[:, k] for indices, m in maps.groups.values() for k, i in enumerate(indices)}


@pytest.mark.parametrize("layer_set", list(LAYER_SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_maps_match_reference_and_torch_path(layer_set, dtype):
    acts, grads = _layers(layer_set, dtype)
    got, torch_path = TRITON.layer_maps(acts, grads), TORCH.layer_maps(acts, grads)
    assert got.scores.dtype == torch.promote_types(dtype, torch.float32)
    assert {size: idx for size, (idx, _) in got.groups.items()} == {s: i for s, (i, _) in torch_path.groups.items()}
    maps, path_maps = _maps_by_layer(got), _maps_by_layer(torch_path)
    for layer, (a, g) in enumerate(zip(acts, grads)):
        tol = _map_tolerance(dtype, *a.shape[1:])
        for b in range(a.shape[0]):
            ref_map, ref_score = _reference_layer(a[b].double().numpy(), g[b].double().numpy())
            np.testing.assert_allclose(maps[layer][b].double().numpy(), ref_map, rtol=0, atol=tol)
            assert abs(float(got.scores[b, layer]) - ref_score) <= (1e-12 if dtype == torch.float64 else 1e-6)
        torch.testing.assert_close(maps[layer], path_maps[layer], rtol=0, atol=tol)
    torch.testing.assert_close(got.scores, torch_path.scores, rtol=0, atol=1e-6)


def test_layer_maps_edge_values():
    """A layer whose weighted sum is negative everywhere (ReLU leaves a constant zero map), a 1 x 1 map
    (constant by definition) and a layer with negative mean gradient (score clamped to 0)."""
    a = [torch.ones(2, 3, 4, 5), torch.randn(2, 6, 1, 1), torch.randn(2, 4, 3, 3)]
    g = [-torch.ones(2, 3, 4, 5), torch.randn(2, 6, 1, 1), -torch.rand(2, 4, 3, 3) - 0.1]
    got = TRITON.layer_maps(a, g)
    maps = _maps_by_layer(got)
    assert torch.equal(maps[0], torch.zeros(2, 4, 5)) and torch.equal(maps[1], torch.zeros(2, 1, 1))
    assert torch.equal(got.scores[:, 2], torch.zeros(2))
    assert torch.equal(got.scores[:, 0], torch.zeros(2))


def test_layer_maps_keep_nan_scores_visible():
    """A NaN gradient must surface as a NaN score (the engine turns it into an error), not vanish in a max."""
    a, g = [torch.randn(1, 4, 3, 3)], [torch.randn(1, 4, 3, 3)]
    g[0][0, 1, 1, 1] = float("nan")
    assert torch.isnan(TRITON.layer_maps(a, g).scores).all()


@pytest.mark.parametrize("layout", ["transposed row", "channels-last column", "transposed 1 x 1"])
def test_layer_maps_read_single_rows_and_columns_by_their_real_stride(layout):
    """A size-1 dim's stride is arbitrary: ``B x C x 1 x h`` transposed is ``B x C x h x 1`` with
    ``stride(3) = h``, and torch calls it contiguous. Its pixels step by ``stride(2)``."""
    gen = torch.Generator().manual_seed(8)
    make = {
        "transposed row": lambda: torch.randn(2, 5, 1, 9, generator=gen, dtype=torch.float64).transpose(2, 3),
        "channels-last column": lambda: torch.randn(2, 5, 9, 1, generator=gen, dtype=torch.float64).to(
            memory_format=torch.channels_last),
        "transposed 1 x 1": lambda: torch.randn(2, 5, 1, 1, generator=gen, dtype=torch.float64).transpose(2, 3),
    }[layout]
    acts, grads = [make(), make()], [make() + 0.3, make() - 0.1]
    got, expected = TRITON.layer_maps(acts, grads), TORCH.layer_maps(acts, grads)
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-12)
    for size, (indices, maps) in expected.groups.items():
        assert got.groups[size][0] == indices
        torch.testing.assert_close(got.groups[size][1], maps, rtol=0, atol=1e-12)
    for i, (a, g) in enumerate(zip(acts, grads)):
        for b in range(2):
            ref_map, ref_score = _reference_layer(a[b].numpy(), g[b].numpy())
            np.testing.assert_allclose(_maps_by_layer(got)[i][b].numpy(), ref_map, rtol=0, atol=1e-12)


def test_layer_maps_blank_a_map_holding_nan_as_the_torch_path_does():
    """A NaN in an activation: the torch path's min-max normalisation makes that map all zeros (NaN compares
    false), and so must the kernels (a GPU's max would drop the NaN and normalise the rest)."""
    gen = torch.Generator().manual_seed(9)
    a, g = torch.rand(2, 3, 4, 5, generator=gen), torch.rand(2, 3, 4, 5, generator=gen)
    a[0, 0, 1, 1] = float("nan")
    got, expected = TRITON.layer_maps([a], [g]), TORCH.layer_maps([a], [g])
    maps = got.groups[(4, 5)][1]
    assert torch.equal(maps[0], torch.zeros_like(maps[0])) and bool((maps[1] > 0).any())
    torch.testing.assert_close(maps, expected.groups[(4, 5)][1], rtol=0, atol=1e-6)


def test_layer_maps_refuse_mixed_inputs():
    a, g = [torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3).double()], [torch.randn(1, 4, 3, 3)] * 2
    with pytest.raises(TypeError, match="one dtype"):
        TRITON.layer_maps(a, [g[0], g[1].double()])
    with pytest.raises(ValueError, match="B x C x h x w"):
        TRITON.layer_maps([torch.randn(1, 4, 3, 3)], [torch.randn(1, 4, 3, 2)])
    with pytest.raises(TypeError, match="Triton kernels take"):
        TRITON.layer_maps([torch.ones(1, 1, 2, 2, dtype=torch.int32)], [torch.ones(1, 1, 2, 2, dtype=torch.int32)])


SCORE_ROWS = [
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # none positive: all weights 0
    [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # all equal: all 1
    [0.5, 0.0, 0.2, 0.2, 0.9, 0.0, 0.1],  # ties and zeros
    [0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0],  # a single positive layer
]


@pytest.mark.parametrize("count", [1, 7, 53, 120])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_winsor_weights_match_reference(count, dtype):
    gen = torch.Generator().manual_seed(count)
    scores = torch.rand(6, count, generator=gen, dtype=torch.float64).sub(0.2).clamp(min=0)
    if count == 7:
        scores[: len(SCORE_ROWS)] = torch.tensor(SCORE_ROWS, dtype=torch.float64)
    scores = scores.to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for p in (0.0, 1.0, 37.5, 50.0, 90.0, 100.0):
        got = TRITON.winsor_weights(scores, p)
        for b in range(scores.shape[0]):
            expected = reference_weights(scores[b].double().numpy(), p)
            np.testing.assert_allclose(got[b].double().numpy(), expected, rtol=0, atol=tol, err_msg=f"p={p} image {b}")
        torch.testing.assert_close(got, TORCH.winsor_weights(scores, p), rtol=0, atol=tol)


def test_winsor_weights_over_many_layers():
    """600 layers: a 1024-wide block, compared 4 columns per step instead of 32 (``TILE``)."""
    scores = torch.rand(2, 600, generator=torch.Generator().manual_seed(6), dtype=torch.float64).sub(0.2).clamp(min=0)
    scores[1, 100:300] = scores[1, 99]  # long runs of ties across steps
    for p in (37.5, 90.0):
        got = TRITON.winsor_weights(scores, p)
        for b in range(2):
            np.testing.assert_allclose(got[b].numpy(), reference_weights(scores[b].numpy(), p), rtol=0, atol=1e-12)


def test_winsor_weights_with_a_mask_and_a_tensor_p():
    scores = torch.rand(4, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.arange(30) % 4 != 0
    got = TRITON.winsor_weights(scores, torch.tensor(73.0), mask)
    assert torch.equal(got[:, ~mask], torch.zeros(4, int((~mask).sum()), dtype=torch.float64))
    for b in range(4):
        expected = reference_weights(scores[b, mask].numpy(), 73.0)
        np.testing.assert_allclose(got[b, mask].numpy(), expected, rtol=0, atol=1e-12)


def test_winsor_mask_of_any_layout_and_a_wrong_length():
    """A strided integer mask means the same as its bools on both paths; a mask of the wrong length is refused
    by both (the Triton kernel would read past its end)."""
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    strided = torch.tensor([1, 9, 0, 9, 1, 9, 1, 9], dtype=torch.int8)[::2]  # 1, 0, 1, 1
    want = TORCH.winsor_weights(scores, 50.0, torch.tensor([True, False, True, True]))
    for kernels in (TORCH, TRITON):
        torch.testing.assert_close(kernels.winsor_weights(scores, 50.0, strided), want, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="4 bools"):
            kernels.winsor_weights(scores, 50.0, torch.tensor([True, False]))


def _reference_sum(groups, weights: np.ndarray, out_size, interpolation: str) -> np.ndarray:
    """Spec step 9 literally: every map to (h*, w*), weighted sum, then to the output size; step 10."""
    star = (max(s[0] for s, _, _ in groups), max(s[1] for s, _, _ in groups))
    batch = weights.shape[0]
    out = np.zeros((batch, *out_size))
    for b in range(batch):
        total = np.zeros(star)
        for _, indices, maps in groups:
            for k, layer in enumerate(indices):
                total += weights[b, layer] * resize_2d(maps[b, k].double().numpy(), star, interpolation)
        out[b] = minmax(resize_2d(total, out_size, interpolation))
    return out


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "sizes,out_size,batch",
    [
        ([(7, 9), (1, 1), (13, 11), (4, 6)], (29, 37), 3),  # upsample to a non-power-of-two size
        ([(10, 12)], (10, 12), 1),  # a single layer at the output size
        ([(14, 14), (7, 7), (3, 3)], (46, 23), 2),  # odd scale factors (nearest's float32 rounding)
        ([(20, 16), (5, 4)], (9, 7), 1),  # downsample
    ],
)
def test_weighted_sum_matches_reference_and_torch_path(sizes, out_size, batch, dtype, interpolation):
    gen = torch.Generator().manual_seed(len(sizes))
    groups, start = [], 0
    for h, w in sizes:
        count = 2 if (h, w) != (1, 1) else 1
        groups.append(((h, w), list(range(start, start + count)), torch.rand(batch, count, h, w, generator=gen, dtype=dtype)))
        start += count
    weights = torch.rand(batch, start, generator=gen, dtype=dtype)
    weights[:, 0] = 0.0  # a skipped layer
    star, sums, heat = TRITON.weighted_sum(groups, weights, out_size, interpolation)
    star_t, sums_t, heat_t = TORCH.weighted_sum(groups, weights, out_size, interpolation)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(heat.double().numpy(), _reference_sum(groups, weights.double().numpy(), out_size, interpolation), rtol=0, atol=tol)
    for got, expected in ((star, star_t), (sums, sums_t), (heat, heat_t)):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    # rendering from S* at any size equals normalising the torch path's resampled S*
    for size in (out_size, (31, 17)):
        torch.testing.assert_close(
            TRITON.render(star, size, interpolation), TORCH.render(star_t, size, interpolation), rtol=0, atol=tol
        )


def test_render_blends_into_frames_like_the_torch_path():
    gen = torch.Generator().manual_seed(3)
    star = torch.rand(2, 7, 9, generator=gen)
    frames = torch.randint(0, 256, (2, 45, 61, 3), generator=gen, dtype=torch.uint8)
    lut = torch.from_numpy(TURBO_LUT.copy())
    for alpha in (0.0, 0.35, 1.0):
        got = TRITON.render(star, (45, 61), "bilinear", frames=frames, alpha=alpha, lut=lut)
        expected = TORCH.render(star, (45, 61), "bilinear", frames=frames, alpha=alpha, lut=lut)
        assert got.dtype == torch.uint8 and got.shape == frames.shape
        assert int((got.int() - expected.int()).abs().max()) <= 1
        assert float((got == expected).float().mean()) > 0.999
    assert torch.equal(TRITON.render(star, (45, 61), "bilinear", frames=frames, alpha=0.0, lut=lut), frames)
    with pytest.raises(ValueError, match="uint8"):
        TRITON.render(star, (45, 61), "bilinear", frames=frames.float(), lut=lut)


@pytest.mark.parametrize(("chroma", "interpolation"), [(2, "bilinear"), (1, "nearest"), (2, "nearest")])
def test_render_blends_into_yuv_planes_like_the_torch_path(chroma, interpolation):
    gen = torch.Generator().manual_seed(4)
    star = torch.rand(2, 7, 9, generator=gen)
    height, width = 22, 30
    size = height * width + 2 * (height // chroma) * (width // chroma)
    frames = YUVFrames(torch.randint(0, 256, (2, size), generator=gen, dtype=torch.uint8), height, width, chroma, "bt709")
    lut = torch.from_numpy(TURBO_LUT.copy())
    for alpha in (0.0, 0.35, 1.0):
        got = TRITON.render(star, (height, width), interpolation, frames=frames, alpha=alpha, lut=lut)
        expected = TORCH.render(star, (height, width), interpolation, frames=frames, alpha=alpha, lut=lut)
        assert isinstance(got, YUVFrames) and got.data.shape == frames.data.shape
        diff = (got.data.int() - expected.data.int()).abs()
        assert int(diff.max()) <= int(np.ceil(alpha * 13)) + 1 and float((diff > 1).float().mean()) <= 5e-3
        assert float((diff == 0).float().mean()) > 0.99
    fresh = TRITON.render(star, (height, width), interpolation, frames=frames, alpha=0.5, lut=lut)
    out = frames.like(frames.data.clone())
    assert TRITON.render(star, (height, width), interpolation, frames=out, alpha=0.5, lut=lut, out=out) is out
    assert torch.equal(out.data, fresh.data) and not torch.equal(out.data, frames.data)  # in place, same values


class _CountingKernel:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel, counter: list[int]) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter[0] += 1
        return self.kernel[grid]


def test_launches_per_batch_do_not_grow_with_the_layer_count(monkeypatch, seeded_models):
    from wcam.kernels.triton import layer_maps, resample, winsor

    counter = [0]
    for module in (layer_maps, resample, winsor):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _CountingKernel(getattr(module, name), counter))
    engine = Engine(seeded_models("resnet18"), kernels="triton")
    images = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    launches = []
    for layers in (engine.layers[-2:], engine.layers):
        counter[0] = 0
        engine.explain(images, layers=layers)
        launches.append(counter[0])
    assert launches[0] == launches[1] == 7, launches  # 3 layer-map + 1 quantile + 3 resample launches


def test_engine_with_triton_kernels_equals_torch_kernels(seeded_models, monkeypatch):
    model = seeded_models("resnet18")
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("WCAM_KERNELS", "triton")
    fused = Engine(model)
    assert fused.kernels.name == "triton"
    plain = Engine(model, kernels="torch")
    a, b = fused.explain(images, p=70.0), plain.explain(images, p=70.0)
    torch.testing.assert_close(a.heatmaps, b.heatmaps, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.layer_weights, b.layer_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.with_p(20.0, layers=slice(5, 15)).heatmaps,
                               b.with_p(20.0, layers=slice(5, 15)).heatmaps, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.heatmap(1, (71, 33)), b.heatmap(1, (71, 33)), rtol=0, atol=1e-5)


def test_kernel_choice_errors(monkeypatch):
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_kernels("cuda", torch.device("cpu"))
    monkeypatch.setenv("WCAM_KERNELS", "fast")
    with pytest.raises(ValueError, match="WCAM_KERNELS"):
        select_kernels(None, torch.device("cpu"))
    monkeypatch.setenv("WCAM_KERNELS", "auto")
    assert select_kernels(None, torch.device("cpu")).name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_kernels("triton", torch.device("cpu"))


def test_every_triton_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on torch's current CUDA device: each entry point makes its tensors' device current
    (an engine on ``cuda:1`` would otherwise launch on GPU 0 with pointers into GPU 1's memory)."""
    import wcam.kernels.dispatch as dispatch

    seen: list[torch.device] = []
    real = dispatch.on_device
    monkeypatch.setattr(dispatch, "on_device", lambda device: seen.append(device) or real(device))
    acts, grads = _layers("batch1", torch.float32)
    maps = TRITON.layer_maps(acts, grads)
    weights = TRITON.winsor_weights(maps.scores, 90.0)
    star, _, _ = TRITON.weighted_sum([(size, idx, m) for size, (idx, m) in maps.groups.items()], weights, (9, 8), "bilinear")
    TRITON.render(star, (9, 8), "bilinear")
    TRITON.render(star, (9, 8), "bilinear", frames=torch.zeros(1, 9, 8, 3, dtype=torch.uint8),
                  lut=torch.from_numpy(TURBO_LUT.copy()))
    assert seen == [torch.device("cpu")] * 5
    guard = real(torch.device("cuda", 1))  # not entered: no GPU here
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
