"""Running explanation methods over a dataset and scoring every heatmap with :mod:`wcam.metrics`.

Everything is measured at the network input size (224 x 224 for most models): the heatmaps as the engine
returns them (min-max normalised), the images as the network sees them (resized whole, normalised) and the
ground-truth masks resized to that size with nearest-neighbour sampling (torch's ``nearest``: source pixel
``floor(i * h / H)``, as OpenCV's INTER_NEAREST).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wcam.engine.engine import Engine
from wcam.engine.runner import EvalGuard
from wcam.eval.datasets import Dataset, Sample
from wcam.kernels import normalize_maps
from wcam.metrics import faithfulness, localisation

logger = logging.getLogger(__name__)

METHOD_KINDS = ("winsor", "gradcam", "layer_mean", "random")
SWEEP = tuple(float(p) for p in range(0, 101, 10))
METRICS = (
    "iou_otsu", "iou_fixed", "com_px", "com_diag", "pointing", "energy", "insertion", "deletion", "drop", "increase",
)  # fmt: skip
HIGHER_IS_BETTER = {
    "iou_otsu": True, "iou_fixed": True, "com_px": False, "com_diag": False, "pointing": True, "energy": True,
    "insertion": True, "deletion": False, "drop": False, "increase": True,
}  # fmt: skip
TARGET_MODES = ("auto", "label", "argmax")
RANDOM_GRID = 7  # the random floor's noise grid: the last feature map's size for most CNNs at 224

# Grad-CAM's usual layer for each named model, where wcam's default is the last Conv2d (Engine.gradcam_layer):
# the output of the last feature block, activation included, which Grad-CAM implementations hook (VGG16: relu5_3,
# as in the Grad-CAM paper). Two stop one step short, because the activation after them is not a module of its own:
# DenseNet121 applies its final ReLU functionally (``features`` ends at norm5), and EfficientNet-Lite0 applies
# its head ReLU6 through a module shared with the stem, which a hook cannot single out (wcam refuses layers that
# run twice), so its entry is the head BatchNorm ``_bn1``.
CONVENTIONAL_GRADCAM_LAYERS = {
    "resnet18": "layer4",
    "resnet50": "layer4",
    "densenet121": "features",
    "vgg16": "features.29",
    "inception_v3": "Mixed_7c",
    "efficientnet_b0": "features.8",
    "mobilenet_v3_large": "features.16",
    "convnext_tiny": "features.7",
    "efficientnet_lite0": "_bn1",
}


class EvalError(ValueError):
    """An evaluation that cannot run as asked (labels that do not fit the model, a bad method list)."""


@dataclass(frozen=True)
class Method:
    """One row of the results: ``kind`` (winsor, gradcam, layer_mean or random) with its ``p`` or ``layer``."""

    kind: str
    p: float | None = None
    layer: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "winsor":
            return f"winsor p={self.p:g}"
        if self.kind == "gradcam":
            return f"gradcam {self.layer}"
        return self.kind


def methods_for(
    engine: Engine, kinds: Sequence[str], ps: Sequence[float], gradcam_layers: Sequence[str]
) -> list[Method]:
    """The rows to evaluate: Winsor-CAM at each p, Grad-CAM on each layer (validated against the model),
    then layer_mean and random, in ``kinds`` order."""
    methods = []
    for kind in dict.fromkeys(kinds):
        if kind == "winsor":
            methods += [Method("winsor", p=float(p)) for p in dict.fromkeys(ps)]
        elif kind == "gradcam":
            names = dict.fromkeys(gradcam_layers)
            methods += [Method("gradcam", layer=engine.layers_for("gradcam", [name])[0]) for name in names]
        elif kind in METHOD_KINDS:
            methods.append(Method(kind))
        else:
            raise EvalError(f"unknown method {kind!r}; known: {', '.join(METHOD_KINDS)}")
    if not methods:
        raise EvalError("no method to evaluate")
    return methods


@dataclass(frozen=True)
class EvalOptions:
    """How to score: which ``metrics`` (see :data:`METRICS`), the insertion/deletion ``steps``, the fixed IoU
    ``threshold``, the pointing-game ``tolerance`` (pixels), images per network pass (``batch_size``), perturbed
    images per forward (``chunk``), where targets come from (``targets``: labels, argmax, or auto = labels
    when the dataset has them) and the random floor's ``seed``."""

    metrics: tuple[str, ...] = METRICS
    steps: int = faithfulness.DEFAULT_STEPS
    threshold: float = 0.5
    tolerance: float = 0.0
    batch_size: int = 8
    chunk: int = 64
    targets: str = "auto"
    seed: int = 0


def random_heatmaps(count: int, size: tuple[int, int], generator: torch.Generator, grid: int = RANDOM_GRID) -> Tensor:
    """The random floor: uniform noise on a ``grid x grid`` lattice (drawn on the CPU from ``generator``),
    upsampled bilinearly to ``size`` and min-max normalised, so that it is as smooth as a CAM of a
    ``grid x grid`` feature map and carries no information about the image."""
    noise = torch.rand(count, 1, grid, grid, generator=generator, dtype=torch.float64)
    return normalize_maps(F.interpolate(noise, size=size, mode="bilinear", align_corners=False)[:, 0]).float()


def resize_masks(masks: Sequence[np.ndarray], size: tuple[int, int], device: torch.device) -> Tensor:
    """Ground-truth masks at their images' sizes, resized to ``size`` (nearest) and stacked: ``B x H x W`` bool."""
    pictures = [torch.from_numpy(np.ascontiguousarray(m))[None, None].float() for m in masks]
    resized = [F.interpolate(m, size=size, mode="nearest")[0, 0] > 0.5 for m in pictures]
    return torch.stack(resized).to(device)


def _batches(samples: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _predict(engine: Engine, images: Tensor) -> Tensor:
    """The model's logits for a batch (no gradients, eval mode, flags restored)."""
    with EvalGuard.of(engine.model)(), torch.no_grad():
        return engine.model(images)


def _targets(batch: Sequence[Sample], logits: Tensor, use_labels: bool, dataset: Dataset) -> Tensor:
    if not use_labels:
        return logits.argmax(dim=1)
    classes = logits.shape[1]
    if dataset.classes is not None and len(dataset.classes) != classes:
        raise EvalError(
            f"the labels of {dataset.name} index {len(dataset.classes)} classes but the model has {classes} outputs: "
            "give weights fine-tuned to those classes, or explain the model's top-1 class (targets 'argmax')"
        )
    for sample in batch:
        if sample.label >= classes:  # type: ignore[operator]
            raise EvalError(f"class index {sample.label} of {sample.name} out of range: the model has {classes}")
    return torch.tensor([s.label for s in batch], device=logits.device)


def _heatmaps(
    engine: Engine, images: Tensor, targets: Tensor, methods: Sequence[Method], generator: torch.Generator
) -> list[Tensor]:
    """Each method's heatmaps for the batch: Winsor-CAM at every p from one network pass (``with_p``)."""
    winsor = None
    maps = []
    for method in methods:
        if method.kind == "winsor":
            if winsor is None:
                winsor = engine.explain(images, targets=targets, p=method.p)
            maps.append(winsor.with_p(method.p).heatmaps)
        elif method.kind == "random":
            maps.append(random_heatmaps(images.shape[0], tuple(images.shape[-2:]), generator).to(images.device))
        else:
            layers = [method.layer] if method.layer is not None else None
            maps.append(engine.explain(images, targets=targets, method=method.kind, layers=layers).heatmaps)
    return maps


def score(
    engine: Engine, images: Tensor, heatmaps: Tensor, masks: Tensor, targets: Tensor, options: EvalOptions
) -> dict[str, Tensor]:
    """Every metric in ``options.metrics`` for one method's heatmaps of a batch: ``{name: B values}``."""
    wanted = set(options.metrics)
    values: dict[str, Tensor] = {}
    if "iou_otsu" in wanted:
        values["iou_otsu"] = localisation.iou(heatmaps, masks, "otsu")
    if "iou_fixed" in wanted:
        values["iou_fixed"] = localisation.iou(heatmaps, masks, options.threshold)
    if "com_px" in wanted:
        values["com_px"] = localisation.centre_of_mass_distance(heatmaps, masks)
    if "com_diag" in wanted:
        values["com_diag"] = localisation.centre_of_mass_distance(heatmaps, masks, normalise=True)
    if "pointing" in wanted:
        values["pointing"] = localisation.pointing_game(heatmaps, masks, options.tolerance)
    if "energy" in wanted:
        values["energy"] = localisation.energy_in_mask(heatmaps, masks)
    model, steps, chunk = engine.model, options.steps, options.chunk
    if "insertion" in wanted:
        values["insertion"] = faithfulness.insertion_auc(model, images, heatmaps, targets, steps, batch_size=chunk)
    if "deletion" in wanted:
        values["deletion"] = faithfulness.deletion_auc(model, images, heatmaps, targets, steps, batch_size=chunk)
    if wanted & {"drop", "increase"}:
        change = faithfulness.confidence_change(model, images, heatmaps, targets, batch_size=chunk)
        values.update({k: v for k, v in (("drop", change.drop), ("increase", change.increase)) if k in wanted})
    return {name: values[name] for name in options.metrics}


def check_options(dataset: Dataset, options: EvalOptions) -> bool:
    """Refuse options that cannot work on ``dataset`` (before any model runs); return whether its labels are
    the targets."""
    unknown = [m for m in options.metrics if m not in METRICS]
    if unknown or not options.metrics:
        raise EvalError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}" if unknown else "no metric")
    if options.targets not in TARGET_MODES:
        raise EvalError(f"targets must be one of {TARGET_MODES}, got {options.targets!r}")
    if options.targets == "label" and not dataset.labelled:
        raise EvalError(f"{dataset.name} has no labels: explain the model's top-1 class instead (targets 'argmax')")
    return options.targets == "label" or (options.targets == "auto" and dataset.labelled)


def evaluate(
    engine: Engine,
    dataset: Dataset,
    methods: Sequence[Method],
    options: EvalOptions = EvalOptions(),
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, object]]:
    """Explain every image of ``dataset`` with every method and score it: one row per (image, method) with
    ``image``, ``method``, ``target``, ``class``, ``probability`` (of the target, on the image) and each
    metric. ``progress(n)`` is called after each batch of n images."""
    if engine.model is None:
        raise EvalError("evaluation needs a torch model (insertion and deletion run it on perturbed images)")
    use_labels = check_options(dataset, options)
    generator = torch.Generator().manual_seed(options.seed)
    categories = engine.categories if not use_labels or dataset.classes is None else dataset.classes
    rows: list[dict[str, object]] = []
    for batch in _batches(dataset.samples, options.batch_size):
        pictures, masks = zip(*(sample.load() for sample in batch))
        images, _ = engine.preprocess(list(pictures), engine.device, engine.dtype)
        truth = resize_masks(masks, tuple(images.shape[-2:]), images.device)
        for sample, empty in zip(batch, (~truth.flatten(1).any(1)).tolist()):
            if empty:
                logger.warning("%s: the object vanishes at the input size: IoU 0, centre distance NaN", sample.name)
        logits = _predict(engine, images)
        targets = _targets(batch, logits, use_labels, dataset)
        probability = torch.softmax(logits.float(), dim=1).gather(1, targets[:, None])[:, 0].tolist()
        scored = [
            {name: v.tolist() for name, v in score(engine, images, heat, truth, targets, options).items()}
            for heat in _heatmaps(engine, images, targets, methods, generator)
        ]
        for i, sample in enumerate(batch):
            target = int(targets[i])
            name = categories[target] if categories is not None and target < len(categories) else str(target)
            for method, values in zip(methods, scored):
                row: dict[str, object] = {
                    "image": sample.name, "method": method.label, "target": target, "class": name,
                    "probability": probability[i],
                }  # fmt: skip
                row.update({metric: values[metric][i] for metric in options.metrics})
                rows.append(row)
        if progress is not None:
            progress(len(batch))
    return rows

