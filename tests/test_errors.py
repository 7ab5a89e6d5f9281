"""Every bad input gets an exception of a specific type whose message names the problem.

For errors raised once the engine's hooks are registered (during or after the forward pass), the model's hook
counts are checked before and after: nothing may be left behind. Inputs are tiny (a 2-conv net, 1-2 images
of 16 x 20) except where the message needs a real architecture (ResNet18 layer names).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import wcam
from helpers import hook_counts
from wcam import (
    Engine,
    ImageError,
    TargetError,
    UnknownLayerError,
    UnknownModelError,
    UnknownWeightsError,
    WeightsFileError,
)
from wcam.engine.models import load_model

SHAPE = (16, 20)
CLASSES = 5



class HookWatch:
    """Checks that hooks were registered during the call (so the check means something) and all removed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.during: list[int] = []

    def __enter__(self) -> "HookWatch":
        self.handle = self.model.register_forward_pre_hook(
            lambda m, i: self.during.append(sum(hook_counts(self.model).values()))
        )
        self.before = hook_counts(self.model)
        return self

    def __exit__(self, *exc) -> None:
        after = hook_counts(self.model)
        self.handle.remove()
        if exc[0] is None:  # only judge when the body (a pytest.raises) succeeded
            assert self.during and self.during[0] > sum(self.before.values()), "engine hooks were not in place"
            assert after == self.before, "hooks left behind"


class TinyNet(nn.Module):
    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def features(self, x):
        return self.conv2(self.conv1(x).relu()).relu().mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny() -> tuple[TinyNet, Engine]:
    model = TinyNet()
    return model, Engine(model)


@pytest.fixture(scope="module")
def resnet(seeded_models) -> nn.Module:
    return seeded_models("resnet18")


# ------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "bad,words",
    [
        (torch.zeros(2, 4, *SHAPE), ["B x 3 x H x W", "(2, 4, 16, 20)"]),
        (torch.zeros(3, *SHAPE), ["B x 3 x H x W", "(3, 16, 20)"]),
        (torch.zeros(2, 1, *SHAPE), ["B x 3 x H x W", "(2, 1, 16, 20)"]),
        (torch.zeros(2, 3, 4, *SHAPE), ["B x 3 x H x W", "(2, 3, 4, 16, 20)"]),
        (torch.zeros(0, 3, *SHAPE), ["empty"]),
        (torch.zeros(0, 3, *SHAPE, dtype=torch.uint8), ["empty", "(0, 3, 16, 20)"]),
        (torch.zeros(2, 3, *SHAPE, dtype=torch.int32), ["int32", "uint8"]),
        (torch.zeros(3, *SHAPE, dtype=torch.int64), ["int64", "uint8"]),
        (np.zeros((*SHAPE, 3), dtype=np.float64), ["float64", "uint8"]),
        (np.zeros((*SHAPE, 3), dtype=np.float32), ["float32", "uint8"]),
        (np.zeros((2, *SHAPE, 3), dtype=np.int16), ["int16", "uint8"]),
        (torch.zeros(4, *SHAPE, dtype=torch.uint8), ["3 x H x W", "(4, 16, 20)"]),
        (torch.zeros(*SHAPE, 3, dtype=torch.uint8), ["3 x H x W", "(16, 20, 3)"]),
        (np.zeros((*SHAPE, 5), dtype=np.uint8), ["H x W x 3", "(16, 20, 5)"]),
        (np.zeros((3, *SHAPE), dtype=np.uint8), ["H x W x 3", "(3, 16, 20)"]),
    ],
    ids=[
        "4-channels", "3-D-float", "1-channel", "5-D-float", "empty-batch", "empty-uint8-batch",
        "int32-tensor", "int64-tensor", "float64-numpy", "float32-numpy", "int16-numpy-batch",
        "uint8-tensor-4ch", "uint8-tensor-hwc", "numpy-5ch", "numpy-chw",
    ],
)
def test_bad_images_are_named(tiny, bad, words):
    """Wrong shape, wrong dtype or an empty batch: an ImageError that names the shape or dtype."""
    _, engine = tiny
    with pytest.raises(ImageError) as info:
        engine.explain(bad)
    for word in words:
        assert word in str(info.value)


def test_not_an_image(tiny):
    _, engine = tiny
    with pytest.raises(ImageError, match="str"):
        engine.explain(["cat.jpg"])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_images(tiny, value):
    _, engine = tiny
    bad = images()
    bad[1, 2, 3, 4] = value
    with pytest.raises(ImageError, match="NaN or Inf"):
        engine.explain(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_finite_half_precision_images_are_not_taken_for_inf(tiny, dtype):
    """The finiteness check sums in float32: a float16 sum of these 2 x 3 x 16 x 20 values (1,920 x 60 =
    115,200) would overflow past 65,504 and refuse a valid batch; the Inf next to them is still found."""
    _, engine = tiny
    good = torch.full((2, 3, *SHAPE), 60.0, dtype=dtype)
    assert not torch.isfinite(good.sum()) or dtype == torch.bfloat16  # what the plain sum would do
    assert engine.explain(good).heatmaps.shape == (2, *SHAPE)
    good[1, 0, 0, 0] = math.inf
    with pytest.raises(ImageError, match="NaN or Inf"):
        engine.explain(good)


@pytest.mark.parametrize(
    "empty", [[], (), np.zeros((0, *SHAPE, 3), dtype=np.uint8)], ids=["list", "tuple", "numpy-batch"]
)
def test_no_images(tiny, empty):
    _, engine = tiny
    with pytest.raises(ImageError, match="no images"):
        engine.explain(empty)


def test_image_of_zero_size(tiny):
    _, engine = tiny
    with pytest.raises(ImageError, match="empty image"):
        engine.explain(np.zeros((0, 7, 3), dtype=np.uint8))


# ------------------------------------------------------------------ layers, models, weights


def test_unknown_layer_in_engine_lists_close_names(resnet):
    with pytest.raises(UnknownLayerError) as info:
        Engine(resnet, layers=["conv1", "layer1.0.conv"])
    message = str(info.value)
    assert "'layer1.0.conv'" in message and "layer1.0.conv1" in message and "closest" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("method", ["winsor", "gradcam"])
def test_unknown_layer_in_explain_lists_close_names(resnet, method):
    engine = Engine(resnet)
    before = hook_counts(resnet)
    with pytest.raises(UnknownLayerError) as info:
        engine.explain(images(1), method=method, layers=["layer4.1.conv3"])
    assert "layer4.1.conv3" in str(info.value) and "layer4.1.conv2" in str(info.value)
    assert hook_counts(resnet) == before


def test_empty_or_repeated_layer_list(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="at least one layer"):
        Engine(model, layers=[])
    with pytest.raises(ValueError, match="unique"):
        Engine(model, layers=["conv1", "conv1"])


def test_unknown_model_name_lists_known_models():
    with pytest.raises(UnknownModelError) as info:
        load_model("resnet181", weights=None)
    message = str(info.value)
    assert "'resnet181'" in message
    for known in ("resnet18", "resnet50", "densenet121", "vgg16", "efficientnet_lite0"):
        assert known in message
    with pytest.raises(UnknownModelError, match="known: "):
        Engine.from_name("no_such_net", weights=None)


def test_unknown_torchvision_weights():
    with pytest.raises(UnknownWeightsError) as info:
        load_model("resnet18", weights="IMAGENET1K_V9")
    message = str(info.value)
    assert "IMAGENET1K_V9" in message and "resnet18" in message and "IMAGENET1K_V1" in message


def test_unknown_lite0_weights(tmp_path):
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(UnknownWeightsError) as info:
        Engine.from_name("efficientnet_lite0", weights=missing)
    assert "missing.pth" in str(info.value) and "efficientnet_lite0" in str(info.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"PK\x03\x04 not a zip archive at all", ["cannot read weights file"]),
        ({"conv1.weight": torch.full((2, 2), math.nan)}, ["NaN or Inf", "conv1.weight"]),
        ([torch.zeros(2)], ["does not hold a state dict"]),
        ({"fc.weight": torch.zeros(2, 2)}, ["does not fit resnet18", "Missing key"]),
    ],
    ids=["garbage", "nan", "a-list", "another-model"],
)
def test_bad_weights_files_are_named(tmp_path, content, words):
    """A file that is not a state dict, or holds NaN (which would only show later, as NaN logits), or does not
    fit the model: a WeightsFileError naming the file and the problem."""
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsFileError) as info:
        Engine.from_name("resnet18", weights=str(path))
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_model_without_conv2d():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 20, CLASSES))
    with pytest.raises(ValueError, match="no Conv2d"):
        Engine(model)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Engine(lambda x: x)


# ------------------------------------------------------------------ targets (raised after the forward pass)


@pytest.mark.parametrize(
    "targets,words",
    [
        ([0, -1], ["-1", f"{CLASSES} classes"]),
        ([CLASSES, 0], [str(CLASSES), f"{CLASSES} classes"]),
        (-2, ["-2", f"{CLASSES} classes"]),
        (1000, ["1000", f"{CLASSES} classes"]),
    ],
    ids=["negative", "equal-to-classes", "negative-int", "large-int"],
)
def test_target_out_of_range(tiny, targets, words):
    model, engine = tiny
    with HookWatch(model), pytest.raises(TargetError) as info:
        engine.explain(images(), targets=targets)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("targets", [[1, 2, 3], [1], []], ids=["three", "one", "none"])
def test_wrong_number_of_targets(tiny, targets):
    model, engine = tiny
    with HookWatch(model), pytest.raises(TargetError) as info:
        engine.explain(images(2), targets=targets)
    assert f"got {len(targets)} targets" in str(info.value) and "2 images" in str(info.value)


@pytest.mark.parametrize(
    "targets", [[1.0, 2.0], 1.5, np.array([1.0, 2.0]), torch.tensor([1.0, 2.0])],
    ids=["float-list", "float", "numpy-float", "torch-float"],
)
def test_float_targets(tiny, targets):
    model, engine = tiny
    with HookWatch(model), pytest.raises(TargetError, match="float"):
        engine.explain(images(2), targets=targets)


def test_nested_targets(tiny):
    model, engine = tiny
    with HookWatch(model), pytest.raises(TargetError, match="one int per image"):
        engine.explain(images(2), targets=[[1], [2]])


@pytest.mark.parametrize("targets", ["cat", [0, None], [[1], [2, 3]], object()],
                         ids=["str", "none-in-list", "ragged", "object"])
def test_targets_that_are_no_numbers(tiny, targets):
    model, engine = tiny
    with HookWatch(model), pytest.raises(TargetError, match="an int or one int per image, got"):
        engine.explain(images(2), targets=targets)


@pytest.mark.parametrize("size", [(0, 5), (-3, 5), (4,), 5, (4.0, 5), "ab"])
def test_heatmap_size_must_be_two_positive_ints(tiny, size):
    _, engine = tiny
    explanation = engine.explain(images(1))
    with pytest.raises(ValueError, match=r"size must be \(height, width\), two positive ints"):
        explanation.heatmap(0, size)


def test_heatmap_size_may_be_any_pair_of_ints(tiny):
    _, engine = tiny
    explanation = engine.explain(images(1))
    for size in ((7, 9), [7, 9], np.array([7, 9]), torch.tensor([7, 9]), torch.Size([7, 9])):
        assert explanation.heatmap(0, size).shape == (7, 9)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [({"batch_size": 0}, ValueError, "batch_size"), ({"p": 500}, ValueError, "p must be"),
     ({"method": "x"}, ValueError, "method must be"), ({"layers": ["conv9"]}, UnknownLayerError, "conv9"),
     ({"targets": 1.5}, TypeError, "one int class")],
    ids=["batch_size", "p", "method", "layer", "targets"],
)
def test_stream_arguments_are_checked_before_a_frame_is_read(tiny, kwargs, error, words):
    _, engine = tiny

    def frames():
        raise AssertionError("a frame was read")
        yield

    with pytest.raises(error, match=words):
        engine.explain_stream(frames(), **kwargs)


def test_stream_frames_of_mixed_kinds_are_named(tiny):
    _, engine = tiny
    float_frame, uint8_frame = images(1)[0], np.zeros((*SHAPE, 3), dtype=np.uint8)
    with pytest.raises(ImageError, match="frame 3 is ndarray where frame 2 is a float tensor"):
        list(engine.explain_stream([float_frame] * 3 + [uint8_frame], batch_size=2))
    with pytest.raises(ImageError, match=r"frame 1: a normalised float frame must be 3 x H x W.*\(3, 4, 5\)"):
        list(engine.explain_stream([float_frame, torch.zeros(3, 4, 5)], batch_size=2))


# ------------------------------------------------------------------ p, method, interpolation


# tensors too: with_p took a tensor p into the graph-input path, clamping 150 to 100 and failing on NaN with
# "index -9223372036854775808 is out of bounds"
BAD_P = [-1.0, -1e-9, 100.0001, 1e9, math.nan, math.inf, "90", None, [50.0], True, torch.tensor(math.nan),
         torch.tensor(150.0)]
BAD_P_IDS = ["-1", "-tiny", "100+", "huge", "nan", "inf", "str", "none", "list", "bool", "tensor-nan", "tensor-150"]


@pytest.mark.parametrize("p", BAD_P, ids=BAD_P_IDS)
def test_bad_p_in_explain(tiny, p):
    model, engine = tiny
    before = hook_counts(model)
    with pytest.raises(ValueError) as info:
        engine.explain(images(), p=p)
    assert "p must be a number in [0, 100]" in str(info.value) and repr(p) in str(info.value)
    assert hook_counts(model) == before


@pytest.mark.parametrize("p", [p for p in BAD_P if p is not True], ids=[i for i in BAD_P_IDS if i != "bool"])
def test_bad_p_in_with_p(tiny, p):
    _, engine = tiny
    explanation = engine.explain(images())
    with pytest.raises(ValueError) as info:
        explanation.with_p(p)
    assert "p must be a number in [0, 100]" in str(info.value)


def test_bool_p_in_with_p_is_refused_like_in_explain(tiny):
    """explain(p=True) is refused (a bool is not a percentile); with_p(True) must be too, not read as p=1."""
    _, engine = tiny
    explanation = engine.explain(images())
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 100\]"):
        explanation.with_p(True)


@pytest.mark.parametrize("method", ["gradcam++", "Winsor", "", None])
def test_unknown_method(tiny, method):
    model, engine = tiny
    before = hook_counts(model)
    with pytest.raises(ValueError) as info:
        engine.explain(images(), method=method)
    message = str(info.value)
    assert repr(method) in message and "winsor" in message and "gradcam" in message and "layer_mean" in message
    assert hook_counts(model) == before


@pytest.mark.parametrize("interpolation", ["bicubic", "Bilinear", "area"])
def test_unknown_interpolation(tiny, interpolation):
    model, _ = tiny
    with pytest.raises(ValueError) as info:
        Engine(model, interpolation=interpolation)
    message = str(info.value)
    assert repr(interpolation) in message and "bilinear" in message and "nearest" in message


# ------------------------------------------------------------------ misbehaving models (after hooks are in place)


class FourDOutput(TinyNet):
    def forward(self, x):
        return self.conv2(self.conv1(x))


class OneDOutput(TinyNet):
    def forward(self, x):
        return self.fc(self.features(x)).sum(dim=1)


class TupleOutput(TinyNet):
    def forward(self, x):
        return self.fc(self.features(x)), None


class WrongBatchOutput(TinyNet):
    def forward(self, x):
        return self.fc(self.features(x)).reshape(1, -1)


@pytest.mark.parametrize(
    "cls,words",
    [
        (FourDOutput, ["B x K", "(2, 6, 16, 20)"]),
        (OneDOutput, ["B x K", "(2,)"]),
        (TupleOutput, ["B x K", "tuple"]),
        (WrongBatchOutput, ["B x K", f"(1, {2 * CLASSES})"]),
    ],
    ids=["4-D", "1-D", "tuple", "wrong-batch"],
)
def test_model_output_not_b_x_k(cls, words):
    model = cls()
    with HookWatch(model), pytest.raises(TypeError) as info:
        Engine(model).explain(images(2))
    for word in words:
        assert word in str(info.value)


class NaNLogits(TinyNet):
    def forward(self, x):
        logits = super().forward(x)
        return logits * torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("targets", [None, 0])
def test_model_producing_nan_logits(targets):
    model = NaNLogits()
    with HookWatch(model), pytest.raises(FloatingPointError, match="NaN or Inf logits"):
        Engine(model).explain(images(2), targets=targets)


class InfiniteGradient(TinyNet):
    """Adds ``sqrt(0 * y)`` to conv2's output ``y``: finite logits, but sqrt's derivative at 0 is infinite and
    times 0 gives NaN gradients at conv2, and at conv1 through it, for every image."""

    def features(self, x):
        y = self.conv2(self.conv1(x).relu())
        return (y.relu() + (y * 0).sqrt()).mean(dim=(2, 3))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_nan_gradients_are_refused_naming_the_layer(kernels):
    model = InfiniteGradient()
    with HookWatch(model), pytest.raises(FloatingPointError, match="NaN or Inf gradients at layer 'conv1' for image 0"):
        Engine(model, kernels=kernels).explain(images(2))


class Raising(TinyNet):
    def forward(self, x):
        self.conv1(x)
        raise KeyError("broken model")


def test_model_raising_midway_propagates_its_own_error():
    model = Raising()
    with HookWatch(model), pytest.raises(KeyError, match="broken model"):
        Engine(model).explain(images(2))


class Unused(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Conv2d(3, 2, 1)


def test_layer_that_never_runs_is_named():
    model = Unused()
    with HookWatch(model), pytest.raises(RuntimeError, match="did not run.*spare"):
        Engine(model).explain(images(2))


class Shared(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.fc(self.conv2(self.conv2(self.conv1(x))).relu().mean(dim=(2, 3)))


def test_layer_that_runs_twice_is_named():
    model = Shared()
    with HookWatch(model), pytest.raises(RuntimeError, match="more than once.*conv2"):
        Engine(model).explain(images(2))


def test_layer_with_non_4d_output_is_named(tiny):
    model, engine = tiny
    with HookWatch(model), pytest.raises(TypeError) as info:
        engine.explain(images(2), layers=["conv1", "fc"])
    assert "'fc'" in str(info.value) and "4-D" in str(info.value) and "(2, 5)" in str(info.value)


def test_weights_that_cannot_be_downloaded_are_named(monkeypatch, capsys):
    import urllib.error

    import torchvision.models._api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(wcam.WeightsDownloadError, match=r"cannot download the ResNet18_Weights.IMAGENET1K_V1 "
                       r"weights of resnet18 \(\[Errno -2\] Name or service not known\).*'none' for random"):
        load_model("resnet18")
    from wcam.cli import main

    assert main(["explain", "--demo", "--model", "resnet18"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot download the ResNet18_Weights.IMAGENET1K_V1 weights" in err


def test_errors_are_exported_at_the_top_level():
    assert wcam.ImageError is ImageError and wcam.TargetError is TargetError
    for error in (ImageError, TargetError, UnknownLayerError, UnknownModelError, UnknownWeightsError, WeightsFileError):
        assert issubclass(error, ValueError)

