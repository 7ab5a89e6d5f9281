"""``wcam.metrics``: every metric against values computed by hand on small constructed inputs (the arithmetic is
in the comments), the degenerate inputs (empty mask, constant heatmap, all-zero heatmap), batched == per
image, Otsu against scikit-image as an independent reference, and the argument checks.

The faithfulness metrics run a toy model whose target probability is the mean of the input's first channel
(logits ``log p, log(1 - p)``), so every point of a curve is a sum of a few pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from wcam.metrics import (
    binarise,
    blur_kernel,
    blurred,
    box_masks,
    centre_of_mass,
    centre_of_mass_distance,
    confidence_change,
    curve_auc,
    deletion_auc,
    deletion_curve,
    energy_in_mask,
    insertion_auc,
    insertion_curve,
    iou,
    mask_iou,
    otsu_threshold,
    pixel_order,
    pointing_game,
)


def batch(*maps: list) -> torch.Tensor:
    return torch.tensor(maps, dtype=torch.float32)


def masks(*maps: list) -> torch.Tensor:
    return torch.tensor(maps, dtype=torch.bool)


# ------------------------------------------------------------------ Otsu and IoU


def test_otsu_by_hand_and_against_skimage():
    from skimage.filters import threshold_otsu

    # values 0, 0.1, 0.9, 1 over [0, 1] in 256 bins fall in bins 0, 25 (0.1 * 256 = 25.6), 230 and 255.
    # Splits after bins 0..24 leave {0} | {0.1, 0.9, 1}, after 25..229 {0, 0.1} | {0.9, 1}, after 230..254
    # {0, 0.1, 0.9} | {1}; the middle one has the largest between-class variance (2 * 2 * (m2 - m1)^2), and its
    # first split is after bin 25, whose centre is 25.5 / 256 = 0.099609375. So 0.1 > t is foreground too.
    heat = batch([[0.0, 0.1], [0.9, 1.0]])
    assert otsu_threshold(heat).tolist() == [25.5 / 256]
    assert binarise(heat).tolist() == [[[False, True], [True, True]]]
    assert float(threshold_otsu(heat[0].numpy())) == pytest.approx(25.5 / 256)
    # two levels: every split between them has the same variance; the first (after bin 0) wins: t = 0.5 / 256
    two = batch([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert otsu_threshold(two).tolist() == [0.5 / 256]
    assert float(threshold_otsu(two[0].numpy())) == 0.5 / 256  # skimage breaks the tie the same way
    # a constant map's threshold is its value, so nothing is above it (skimage's too)
    assert otsu_threshold(torch.full((1, 3, 3), 0.7, dtype=torch.float64)).tolist() == [0.7]
    assert float(threshold_otsu(np.full((3, 3), 0.7))) == 0.7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_otsu_matches_skimage_on_random_and_smooth_maps(dtype):
    from skimage.filters import threshold_otsu

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(40, 37, 29, generator=generator, dtype=dtype)
    lattice = torch.rand(40, 1, 7, 7, generator=generator, dtype=dtype)
    smooth = torch.nn.functional.interpolate(lattice, size=(56, 56), mode="bilinear")[:, 0]
    skewed = torch.rand(40, 16, 16, generator=generator, dtype=dtype) ** 4 * 3 - 1  # not in [0, 1]
    for maps in (noise, smooth, skewed):
        ours = otsu_threshold(maps)
        for i in range(maps.shape[0]):
            reference = float(threshold_otsu(maps[i].numpy()))
            assert float(ours[i]) == pytest.approx(reference, abs=1e-6)
            assert torch.equal(maps[i] > ours[i], maps[i] > reference)


def test_iou_by_hand_and_degenerate_cases():
    heat = batch([[0.9, 0.8, 0.1], [0.7, 0.2, 0.0], [0.0, 0.0, 0.0]])
    truth = masks([[True, True, False], [False, True, False], [False, False, True]])
    # fixed t = 0.5: P = {0.9, 0.8, 0.7} (3 px), G has 4 px, P and G = {0.9, 0.8}: 2 / (3 + 4 - 2) = 0.4
    assert iou(heat, truth, threshold=0.5).tolist() == pytest.approx([0.4])
    # P is empty at t = 1 (map > t, strictly): 0 / 4 = 0
    assert iou(heat, truth, threshold=1.0).tolist() == [0.0]
    empty = torch.zeros_like(truth)
    assert iou(heat, empty, threshold=0.5).tolist() == [0.0]  # 0 / |P| = 0
    assert iou(torch.zeros_like(heat), empty).tolist() == [0.0]  # union empty: 0 by convention
    # constant and all-zero heatmaps: Otsu's t is the value itself, P is empty, IoU = 0 / |G| = 0
    assert iou(torch.full_like(heat, 0.3), truth).tolist() == [0.0]
    assert iou(torch.zeros_like(heat), truth).tolist() == [0.0]
    assert mask_iou(truth, truth).tolist() == [1.0]
    # float64 heatmaps get the ratio of counts in float64, not rounded through float32
    wide = torch.zeros(1, 4, 4, dtype=torch.float64)
    wide[0, :3, :3] = 1.0  # P: 9 px
    square = torch.zeros(1, 4, 4, dtype=torch.bool)
    square[0, 1:, 1:] = True
    square[0, 0, 3] = True  # G: 10 px; P and G: 4 px; P or G: 9 + 10 - 4 = 15 px
    got = iou(wide, square, threshold=0.5)
    assert got.dtype == torch.float64 and got.item() == 4 / 15


# ------------------------------------------------------------------ centre of mass, pointing, energy


def test_centre_of_mass_by_hand():
    heat = batch([[0, 0, 0], [0, 0, 1], [0, 0, 3]])
    # weights 1 at (1, 2) and 3 at (2, 2): row (1 * 1 + 3 * 2) / 4 = 1.75, column 2
    assert centre_of_mass(heat).tolist() == [[1.75, 2.0]]
    truth = masks([[True, True, False], [False, False, False], [False, False, False]])
    assert centre_of_mass(truth).tolist() == [[0.0, 0.5]]
    # distance sqrt(1.75^2 + 1.5^2) = sqrt(5.3125); normalised by sqrt(3^2 + 3^2) = sqrt(18)
    assert centre_of_mass_distance(heat, truth).tolist() == pytest.approx([math.sqrt(5.3125)])
    assert centre_of_mass_distance(heat, truth, normalise=True).tolist() == pytest.approx([math.sqrt(5.3125 / 18)])


def test_centre_of_mass_degenerate_cases():
    truth = masks([[True, True, False], [False, False, False], [False, False, False]])
    # all-zero and constant heatmaps: the image centre (1, 1); to (0, 0.5): sqrt(1 + 0.25)
    for heat in (torch.zeros(1, 3, 3), torch.full((1, 3, 3), 0.4)):
        assert centre_of_mass(heat).tolist() == [[1.0, 1.0]]
        assert centre_of_mass_distance(heat, truth).tolist() == pytest.approx([math.sqrt(1.25)])
    # an empty mask has no centre
    assert math.isnan(float(centre_of_mass_distance(torch.rand(1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.bool))[0]))


def test_pointing_game_by_hand():
    truth = masks([[False, False, False], [False, True, False], [False, False, False]])
    inside = batch([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    beside = batch([[0, 0, 0], [0, 0, 1], [0, 0, 0]])  # 1 px from the mask
    corner = batch([[0, 0, 0], [0, 0, 0], [0, 0, 1]])  # sqrt(2) px from the mask
    assert pointing_game(inside, truth).tolist() == [1.0]
    assert pointing_game(beside, truth).tolist() == [0.0]
    assert pointing_game(beside, truth, tolerance=1).tolist() == [1.0]
    assert pointing_game(corner, truth, tolerance=1).tolist() == [0.0]
    assert pointing_game(corner, truth, tolerance=1.5).tolist() == [1.0]
    # a tie between an inside and an outside maximum: half a hit
    assert pointing_game(batch([[0, 0, 0], [0, 1, 1], [0, 0, 0]]), truth).tolist() == [0.5]
    # constant and all-zero maps: every pixel is a maximum, 1 of 9 is inside
    assert pointing_game(torch.full((1, 3, 3), 0.2), truth).tolist() == pytest.approx([1 / 9])
    assert pointing_game(torch.zeros(1, 3, 3), truth).tolist() == pytest.approx([1 / 9])
    assert pointing_game(inside, torch.zeros_like(truth)).tolist() == [0.0]
    # a tolerance beyond the image reaches every pixel, without building a disc of that size
    assert pointing_game(corner, truth, tolerance=1e9).tolist() == [1.0]


def test_energy_by_hand():
    heat = batch([[1, 2], [3, 4]])
    top = masks([[True, True], [False, False]])
    assert energy_in_mask(heat, top).tolist() == pytest.approx([0.3])  # (1 + 2) / 10
    assert energy_in_mask(torch.zeros(1, 2, 2), top).tolist() == [0.5]  # as constant: |G| / HW = 2 / 4
    assert energy_in_mask(torch.full((1, 2, 2), 7.0), top).tolist() == [0.5]
    assert energy_in_mask(heat, torch.zeros_like(top)).tolist() == [0.0]


def test_box_masks():
    # x0 = 1, x1 = 3 (exclusive) -> columns 1, 2; y0 = 0, y1 = 2 -> rows 0, 1
    expected = [[[False, True, True, False], [False, True, True, False], [False, False, False, False]]]
    assert box_masks(torch.tensor([[1, 0, 3, 2]]), 3, 4).tolist() == expected
    # fractional box: column centres 0.5 and 1.5 lie in [0.4, 1.6), row centre 0.5 in [0, 1)
    expected = [[[True, True, False], [False, False, False]]]
    assert box_masks(torch.tensor([[0.4, 0.0, 1.6, 1.0]]), 2, 3).tolist() == expected
    assert not box_masks(torch.tensor([[5.0, 5.0, 9.0, 9.0]]), 3, 3).any()  # outside the image


def test_localisation_batched_equals_per_image():
    generator = torch.Generator().manual_seed(1)
    heat = torch.rand(5, 12, 10, generator=generator) ** 3
    heat[1] = 0.0  # all zero
    heat[2] = 0.5  # constant
    truth = box_masks(torch.tensor([[1, 1, 6, 5], [0, 0, 10, 12], [3, 2, 4, 9], [2, 2, 8, 8], [0, 0, 1, 1]]), 12, 10)
    truth[4] = False  # empty
    metrics = [
        lambda h, m: iou(h, m),
        lambda h, m: iou(h, m, threshold=0.3),
        centre_of_mass_distance,
        lambda h, m: centre_of_mass_distance(h, m, normalise=True),
        lambda h, m: pointing_game(h, m, tolerance=2),
        energy_in_mask,
    ]
    for metric in metrics:
        batched = metric(heat, truth)
        single = torch.cat([metric(heat[i : i + 1], truth[i : i + 1]) for i in range(5)])
        assert torch.equal(batched.isnan(), single.isnan())
        assert torch.equal(batched.nan_to_num(), single.nan_to_num())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: iou(torch.rand(3, 3), torch.ones(3, 3, dtype=torch.bool)), "B x H x W"),
        (lambda: iou(torch.ones(1, 3, 3, dtype=torch.long), torch.ones(1, 3, 3, dtype=torch.bool)), "floating"),
        (lambda: iou(torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2, dtype=torch.bool)), "NaN"),
        (lambda: iou(torch.rand(1, 2, 2), torch.ones(1, 2, 2)), "bool"),
        (lambda: iou(torch.rand(1, 2, 2), torch.ones(1, 2, 3, dtype=torch.bool)), "do not match"),
        (lambda: iou(torch.rand(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), threshold="mean"), "otsu"),
        (lambda: energy_in_mask(-torch.rand(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool)), "non-negative"),
        (lambda: pointing_game(torch.rand(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), tolerance=-1), "tolerance"),
        (lambda: box_masks(torch.tensor([1, 2, 3, 4]), 4, 4), "N x 4"),
        (lambda: otsu_threshold(torch.rand(1, 2, 2), bins=1), "bins"),
    ],
)
def test_localisation_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------ faithfulness


class MeanOfFirstChannel(nn.Module):
    """Class 0's probability is the mean of channel 0 (clamped into (0, 1)); records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        p = (x[:, 0].flatten(1).mean(1) * self.scale).clamp(1e-9, 1 - 1e-9)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


IMAGE = torch.tensor([[[0.8, 0.6], [0.4, 0.2]], [[5.0, 5.0], [5.0, 5.0]], [[-3.0, 0.0], [1.0, 2.0]]])[None]
HEAT = batch([[0.1, 0.9], [0.5, 0.3]])  # order (0, 1), (1, 0), (1, 1), (0, 0): channel-0 values 0.6, 0.4, 0.2, 0.8


def test_insertion_and_deletion_by_hand():
    model = MeanOfFirstChannel()
    base = torch.full_like(IMAGE, 0.1)
    curve = insertion_curve(model, IMAGE, HEAT, 0, steps=4, baseline=base)
    # one pixel per step into a 0.1 baseline: 0.4/4, (0.6 + 0.3)/4, (0.6 + 0.4 + 0.2)/4, (1.2 + 0.1)/4, 2.0/4
    assert curve.tolist() == [pytest.approx([0.1, 0.225, 0.3, 0.325, 0.5])]
    # trapezoid, dx = 1/4: (0.1/2 + 0.225 + 0.3 + 0.325 + 0.5/2) / 4 = 1.15 / 4
    assert insertion_auc(model, IMAGE, HEAT, 0, steps=4, baseline=base).tolist() == pytest.approx([0.2875])
    # steps = 3: floor(4k/3) = 0, 1, 2, 4 pixels: (0.1/2 + 0.225 + 0.3 + 0.5/2) / 3 = 0.825 / 3
    assert insertion_auc(model, IMAGE, HEAT, 0, steps=3, baseline=base).tolist() == pytest.approx([0.275])
    # deletion to zeros (the default): 2.0/4, 1.4/4, 1.0/4, 0.8/4, 0 (clamped to 1e-9)
    curve = deletion_curve(model, IMAGE, HEAT, 0, steps=4)
    assert curve.tolist() == [pytest.approx([0.5, 0.35, 0.25, 0.2, 0.0], abs=1e-7)]
    # (0.5/2 + 0.35 + 0.25 + 0.2 + 0/2) / 4 = 1.05 / 4
    assert deletion_auc(model, IMAGE, HEAT, 0, steps=4).tolist() == pytest.approx([0.2625], abs=1e-7)


def _folded_gaussian(size: int, sigma: float) -> np.ndarray:
    """The reference for RISE's gkern, by its definition and loops: a normalised Gaussian of radius
    int(4 sigma + 0.5) correlated along each axis with a centred delta, indices past the window reflected
    (d c b a | a b c d | d c b a)."""
    radius = int(4.0 * sigma + 0.5)
    weights = {j: math.exp(-0.5 * (j / sigma) ** 2) for j in range(-radius, radius + 1)}
    total = sum(weights.values())
    line = np.zeros(size)
    for i in range(size):
        for j, weight in weights.items():
            m = (i + j) % (2 * size)
            if (m if m < size else 2 * size - 1 - m) == size // 2:
                line[i] += weight / total
    return np.outer(line, line)


@pytest.mark.parametrize("size, sigma", [(11, 5.0), (7, 2.0), (51, math.sqrt(50))])
def test_blur_kernel_is_rises_gkern(size, sigma):
    """11/5: RISE's insertion; 7/2: a kernel that fits its window; 51/sqrt(50): a common larger choice."""
    kernel = blur_kernel(size, sigma).numpy()
    np.testing.assert_allclose(kernel, _folded_gaussian(size, sigma), rtol=0, atol=1e-15)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)


def test_insertion_default_baseline_is_rises_blur():
    """RISE's substrate: conv2d with the 3 x 3 x 11 x 11 float32 kernel (gkern on the diagonal), zero padding 5."""
    kernel = np.zeros((3, 3, 11, 11))
    for c in range(3):
        kernel[c, c] = _folded_gaussian(11, 5.0)
    image = torch.rand(2, 3, 16, 13, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.conv2d(image.double(), torch.from_numpy(kernel.astype(np.float32)).double(), padding=5)
    assert (blurred(image).double() - expected).abs().max().item() <= 1e-6  # float32 sums of 121 products <= 1
    flat = torch.full((1, 3, 16, 16), 0.25)
    assert blurred(flat)[0, :, 8, 8].tolist() == pytest.approx([0.25] * 3, abs=1e-6)  # inside: kernel sums to 1
    assert blurred(flat)[0, 0, 0, 0].item() == pytest.approx(0.25 * blur_kernel()[5:, 5:].sum().item(), abs=1e-6)
    model = MeanOfFirstChannel()
    heat = torch.rand(2, 16, 13, generator=torch.Generator().manual_seed(1))
    default = insertion_curve(model, image, heat, 0, steps=5)
    assert torch.equal(default, insertion_curve(model, image, heat, 0, steps=5, baseline=blurred(image)))
    assert blurred(image[:, :, :3, :2]).shape == (2, 3, 3, 2)  # zero padding: any size has a blurred copy


class Recorder(nn.Module):
    """Logits from the mean of all channels; keeps every input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        mean = x.mean(dim=(1, 2, 3)) * self.scale
        return torch.stack([mean, -mean], dim=1)


@pytest.mark.parametrize("curve", [insertion_curve, deletion_curve])
def test_each_step_moves_all_channels_of_the_hottest_pixels(curve):
    """At step k the floor(k N / steps) hottest pixels hold the image's values in all three channels (the
    others the baseline's): a channel left behind or a pixel out of order fails."""
    image = torch.rand(1, 3, 5, 4, generator=torch.Generator().manual_seed(2))
    baseline = image + 10.0
    heat = torch.rand(1, 5, 4, generator=torch.Generator().manual_seed(3))
    model = Recorder()
    curve(model, image, heat, 0, steps=6, baseline=baseline, batch_size=100)
    steps = torch.cat(model.seen)
    assert steps.shape == (7, 3, 5, 4)
    hottest = heat.flatten().argsort(descending=True)
    for k, x in enumerate(steps):
        from_image = (x == image[0]).flatten(1)  # 3 x N
        assert ((x == image[0]) | (x == baseline[0])).all()
        assert (from_image.all(dim=0) == from_image.any(dim=0)).all(), f"step {k}: channels apart"
        count = k * 20 // 6 if curve is insertion_curve else 20 - k * 20 // 6
        moved = set(hottest[: k * 20 // 6].tolist())
        expected = moved if curve is insertion_curve else set(range(20)) - moved
        assert set(from_image[0].nonzero().flatten().tolist()) == expected and len(expected) == count


def test_degenerate_heatmaps_use_row_major_order():
    model = MeanOfFirstChannel()
    # constant and all-zero heatmaps: ties in row-major order, (0, 0) = 0.8 first, then 0.6, 0.4, 0.2
    for heat in (torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5)):
        assert pixel_order(heat).tolist() == [[[0, 1], [2, 3]]]
        # deletion: 2.0/4, 1.2/4, 0.6/4, 0.2/4, 0
        curve = deletion_curve(model, IMAGE, heat, 0, steps=4)
        assert curve.tolist() == [pytest.approx([0.5, 0.3, 0.15, 0.05, 0.0], abs=1e-7)]


def test_curve_auc():
    assert curve_auc(torch.tensor([[0.0, 1.0]])).tolist() == [0.5]
    assert curve_auc(torch.tensor([[1.0, 1.0, 1.0]])).tolist() == [1.0]
    with pytest.raises(ValueError, match="steps"):
        curve_auc(torch.tensor([[1.0]]))


def test_confidence_change_by_hand():
    model = MeanOfFirstChannel()
    second = torch.tensor([[[0.9, -0.5], [0.4, 0.4]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])[None]
    images = torch.cat([IMAGE, IMAGE, second])
    heat = torch.stack([batch([[1, 0], [0.5, 0]])[0], torch.ones(2, 2), batch([[1, 0], [1, 1]])[0]])
    change = confidence_change(model, images, heat, 0)
    # image 0: Y = 2.0/4 = 0.5, O = (0.8 + 0.2)/4 = 0.25: drop (0.5 - 0.25)/0.5 = 0.5, no increase
    # image 1: the map is all ones, O = Y: drop 0, no increase (O > Y is strict)
    # image 2: Y = 1.2/4 = 0.3, O = 1.7/4 = 0.425 > Y: drop 0, increase 1
    assert change.drop.tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert change.increase.tolist() == [0.0, 0.0, 1.0]


def test_faithfulness_batched_equals_per_image_and_restores_training_flags():
    model = MeanOfFirstChannel().train()
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 7, 6, generator=generator)
    heat = torch.rand(3, 7, 6, generator=generator)
    heat[1] = 0.0
    targets = torch.tensor([0, 1, 0])
    for metric in (insertion_auc, deletion_auc):
        batched = metric(model, images, heat, targets, steps=7, batch_size=5)
        single = torch.cat(
            [metric(model, images[i : i + 1], heat[i : i + 1], targets[i : i + 1], steps=7) for i in range(3)]
        )
        assert torch.allclose(batched, single, atol=1e-6)
    change = confidence_change(model, images, heat, targets, batch_size=2)
    for i in range(3):
        one = confidence_change(model, images[i : i + 1], heat[i : i + 1], targets[i : i + 1])
        assert torch.allclose(change.drop[i], one.drop[0]) and change.increase[i] == one.increase[0]
    assert model.training and not any(model.modes)  # ran in eval mode, and is back in training mode


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: insertion_auc(m, IMAGE[:, :2], HEAT, 0), "B x 3 x H x W"),
        (lambda m: insertion_auc(m, IMAGE, HEAT[:, :1], 0), "do not match"),
        (lambda m: insertion_auc(m, IMAGE, HEAT, 0.5), "int"),
        (lambda m: insertion_auc(m, IMAGE, HEAT, [0, 1]), "2 targets"),
        (lambda m: deletion_auc(m, IMAGE, HEAT, 2), "out of range"),
        (lambda m: insertion_auc(m, IMAGE, HEAT, 0, steps=0), "steps"),
        (lambda m: deletion_auc(m, IMAGE, HEAT, 0, baseline=torch.zeros(3, 2, 2)), "baseline"),
        (lambda m: confidence_change(m, IMAGE, -HEAT, 0), "non-negative"),
        (lambda m: confidence_change(m, IMAGE, HEAT * 3 + 1, 0), "normalised to"),
    ],
)
def test_faithfulness_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(MeanOfFirstChannel())
