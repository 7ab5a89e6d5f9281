"""The engine against the independent float64 reference (tests/reference.py), on real architectures.

Three comparisons, each with its tolerance:

1. float64 engine vs float64 reference, end to end: 1e-9 max abs on normalised heatmaps. Same precision,
   only summation order differs (~1e-15 relative per op), so anything larger is a bug in hooks, batching,
   grouping by shape, quantile, weights or resampling. This holds for every input.
2. the engine's float32 CAM maths on the reference network's activations and gradients: 1e-5 (the issue's
   bound). float32 rounds at ~6e-8 relative; maps sum up to 2048 channels and the heatmap up to 120 maps, so
   a few 1e-7 is expected (measured <= 1.1e-6) and 1e-5 leaves a margin of ~10x.
3. float32 engine end to end vs float64 reference: 1e-5, on inputs listed below. Float32 cannot promise this
   for every input: where a pre-activation lies within rounding of a ReLU/ReLU6 kink or a max-pool tie, the
   float32 and float64 networks take different branches and that gradient element differs outright (measured:
   seeded random VGG16/InceptionV3 and the pretrained Lite0 on `astronaut` reach 1e-4..2e-3 that way, while the
   CAM maths on the same float64 network values stay at 6e-7). That is the network's float32 conditioning,
   which any float32 implementation, the authors' included, shares; comparisons 1 and 2 pin the engine down for
   every input, and these seeds/photos are ones whose float32 pass takes the float64 branches.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import reference_combine, reference_network

from wcam import Engine
from wcam.engine.explanation import Explanation
from wcam.kernels.dispatch import select_kernels

PS = (0.0, 1.0, 50.0, 90.0, 100.0)
# (model, input H x W, seed of a float32-well-conditioned input): small, non-square inputs keep the suite fast
# and make h* != w* matter.
MODELS = [
    ("resnet18", (64, 80), 0),
    ("resnet50", (64, 80), 0),
    ("densenet121", (64, 80), 0),
    ("vgg16", (64, 80), 1),
    ("inception_v3", (96, 112), 1),
]
IDS = [m for m, _, _ in MODELS]


def _inputs(shape: tuple[int, int], seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(heatmaps: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(heatmaps.double().numpy() - expected).max())


def _check_all_methods(engine: Engine, images: torch.Tensor, atol: float) -> None:
    """Every p, layer_mean and gradcam, end to end, against the reference at ``atol``."""
    net = reference_network(engine.model, images, engine.layers)
    explanation = engine.explain(images, p=90.0)
    np.testing.assert_array_equal(explanation.targets.numpy(), net["targets"])
    np.testing.assert_allclose(explanation.layer_scores.double().numpy(), net["scores"], rtol=atol * 100, atol=0)
    for p in PS:
        ref = reference_combine(net, p=p)
        got = explanation.with_p(p)
        assert _max_diff(got.heatmaps, ref["heatmaps"]) <= atol, f"p={p}"
        np.testing.assert_allclose(got.layer_weights.double().numpy(), ref["weights"], rtol=0, atol=atol * 10)
    mean = engine.explain(images, method="layer_mean")
    assert _max_diff(mean.heatmaps, reference_combine(net, method="layer_mean")["heatmaps"]) <= atol
    gradcam = engine.explain(images, method="gradcam")
    assert gradcam.layer_names == [engine.gradcam_layer]
    ref = reference_combine(reference_network(engine.model, images, gradcam.layer_names), method="gradcam")
    assert _max_diff(gradcam.heatmaps, ref["heatmaps"]) <= atol


def _check_float32_maths(net: dict, out_size: tuple[int, int], kernels: str = "torch", ps: tuple = PS) -> None:
    """The engine's float32 CAM maths (torch or Triton kernels) fed the reference network's float64 values,
    cast to float32, for winsor at each of ``ps`` and layer_mean."""
    chosen = select_kernels(kernels, torch.device("cpu"))
    maps = chosen.layer_maps(
        [torch.from_numpy(a).float() for a in net["activations"]],
        [torch.from_numpy(g).float() for g in net["gradients"]],
    )
    count = maps.num_layers
    for method, values in (("winsor", ps), ("layer_mean", (90.0,))):
        for p in values:
            got = Explanation.build(
                maps, method=method, p=p, selected=range(count), out_size=out_size, interpolation="bilinear",
                logits=torch.zeros(1), targets=torch.zeros(1), layer_names=[str(i) for i in range(count)],
                image_sizes=[out_size], kernels=chosen,
            )
            ref = reference_combine(net, p=p, method=method, out_size=out_size)
            assert _max_diff(got.heatmaps, ref["heatmaps"]) <= 1e-5, f"{method} p={p}"


def _first_image(net: dict) -> dict:
    """The reference network's values for the first image alone."""
    one = {key: net[key][:1] for key in ("logits", "targets", "scores", "maps")}
    per_layer = {key: [values[:1] for values in net[key]] for key in ("activations", "gradients")}
    return {**net, **one, **per_layer}


@pytest.mark.parametrize("name,shape,seed", MODELS, ids=IDS)
def test_float64_engine_matches_float64_reference(seeded_models, name, shape, seed):
    engine = Engine(copy.deepcopy(seeded_models(name)).double())
    _check_all_methods(engine, _inputs(shape, seed=0).double(), atol=1e-9)


@pytest.mark.parametrize(
    "name,interpolation", [("resnet18", "nearest"), ("densenet121", "bilinear")]
)
def test_triton_kernels_float64_engine_matches_float64_reference(seeded_models, name, interpolation):
    """The whole engine through the Triton kernels (interpreted on this CPU) in float64: the same 1e-9 as the
    torch path, so every kernel (layer maps, quantile clamp, resampling, normalisation) is pinned down on a
    real layer set (DenseNet121: 120 layers of 5 sizes, more than one block of the quantile's rank count)."""
    engine = Engine(copy.deepcopy(seeded_models(name)).double(), interpolation=interpolation, kernels="triton")
    images = _inputs((32, 48), seed=0).double()  # interpreted: small, down to 1 x 2 maps in the last layers
    net = reference_network(engine.model, images, engine.layers)
    explanation = engine.explain(images, p=90.0)
    for p in PS:
        ref = reference_combine(net, p=p, interpolation=interpolation)
        assert _max_diff(explanation.with_p(p).heatmaps, ref["heatmaps"]) <= 1e-9, f"p={p}"
    ref = reference_combine(net, method="layer_mean", interpolation=interpolation)
    assert _max_diff(engine.explain(images, method="layer_mean").heatmaps, ref["heatmaps"]) <= 1e-9


@pytest.mark.parametrize("name,shape,seed", MODELS, ids=IDS)
def test_float32_engine_matches_float64_reference(seeded_models, name, shape, seed):
    engine = Engine(seeded_models(name))
    images = _inputs(shape, seed)
    _check_all_methods(engine, images, atol=1e-5)
    net = reference_network(engine.model, _inputs(shape, seed=0), engine.layers)
    _check_float32_maths(net, shape)
    if name == "resnet50":  # the Triton kernels on a real float32 layer set (interpreted: one model is enough)
        _check_float32_maths(net, shape, kernels="triton", ps=(0.0, 90.0))


def test_pretrained_lite0_on_real_photos(lite0, photos):
    engine = Engine(lite0.model, preprocess=lite0.preprocess, categories=lite0.categories)
    names = ["chelsea", "coffee", "astronaut"]
    explanation = engine.explain([photos[n] for n in names])
    assert [engine.categories[t] for t in explanation.targets[:2]] == ["Egyptian cat", "espresso"]
    batch, _ = engine.preprocess([photos[n] for n in names], engine.device)
    net = reference_network(engine.model, batch, engine.layers)
    _check_float32_maths(net, (224, 224))  # all three photos
    # interpreted Triton is slow: one photo, and p at both ends of the quantile's range
    _check_float32_maths(_first_image(net), (224, 224), kernels="triton", ps=(0.0, 90.0))
    conditioned = [0, 1]  # chelsea, coffee: float32 takes the float64 branches (see module docstring)
    for p in PS:
        ref = reference_combine(net, p=p)["heatmaps"][conditioned]
        assert _max_diff(explanation.with_p(p).heatmaps[conditioned], ref) <= 1e-5, f"p={p}"
    engine64 = Engine(copy.deepcopy(lite0.model).double(), preprocess=lite0.preprocess)
    exact = engine64.explain(batch.double())  # the very input the reference saw
    for p in PS:
        assert _max_diff(exact.with_p(p).heatmaps, reference_combine(net, p=p)["heatmaps"]) <= 1e-6, f"p={p}"


def test_layer_counts_follow_the_spec(seeded_models):
    counts = {name: len(Engine(seeded_models(name)).layers) for name, _, _ in MODELS if name != "resnet18"}
    assert counts == {"resnet50": 53, "densenet121": 120, "vgg16": 13, "inception_v3": 94}


def test_batch_of_four_with_different_targets_equals_single_runs(seeded_models):
    engine = Engine(seeded_models("resnet18"))
    images = _inputs((64, 80), seed=0, batch=4)
    targets = [3, 999, 0, 517]
    batched = engine.explain(images, targets=targets, p=50.0)
    assert batched.targets.tolist() == targets
    ref = reference_combine(reference_network(engine.model, images, engine.layers, targets), p=50.0)
    assert _max_diff(batched.heatmaps, ref["heatmaps"]) <= 1e-5
    for i, target in enumerate(targets):
        single = engine.explain(images[i : i + 1], targets=[target], p=50.0)
        torch.testing.assert_close(single.heatmaps[0], batched.heatmaps[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(single.layer_weights[0], batched.layer_weights[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(single.logits[0], batched.logits[i], atol=1e-4, rtol=1e-5)


def test_nearest_interpolation_matches_reference(seeded_models):
    engine = Engine(copy.deepcopy(seeded_models("resnet18")).double(), interpolation="nearest")
    images = _inputs((64, 80), seed=0).double()
    got = engine.explain(images, p=90.0)
    ref = reference_combine(reference_network(engine.model, images, engine.layers), p=90.0, interpolation="nearest")
    assert _max_diff(got.heatmaps, ref["heatmaps"]) <= 1e-9
