"""The public entry point: an Engine explains batches of images with Winsor-CAM or its baselines."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from wcam.engine.explanation import METHODS, Explanation
from wcam.engine.layers import conv_layers, preset_layers, resolve_layers
from wcam.engine.models import load_model
from wcam.engine.preprocess import Preprocess
from wcam.engine.runner import EagerRunner
from wcam.kernels import check_percentile, group_maps
from wcam.kernels.resample import INTERPOLATIONS

logger = logging.getLogger(__name__)


class Engine:
    """Explains a CNN's decisions: one forward and one backward per batch, then batched CAM maths.

    ``layers`` defaults to every Conv2d (with the authors' presets for InceptionV3 and EfficientNet-B0).
    The engine holds no per-call state, so one Engine may serve many threads at once. The model is used
    in eval mode during each call and its flags are restored afterwards; its parameters are not touched.
    ``device`` moves the model there (``model.to(device)``); by default the model's own device is used.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        interpolation: str = "bilinear",
        preprocess: Preprocess | None = None,
        categories: list[str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if device is not None:
            model.to(device)
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        self.dtype = first.dtype if first is not None and first.dtype.is_floating_point else torch.float32
        self.model = model
        self.layers = resolve_layers(model, layers) if layers is not None else preset_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer to explain; pass layers=[...]")
        convs = conv_layers(model)
        self.gradcam_layer = convs[-1] if convs else self.layers[-1]
        self.interpolation = interpolation
        self.preprocess = preprocess or Preprocess()
        self.categories = categories
        self._runner = EagerRunner(model)

    @classmethod
    def from_name(cls, name: str, weights: str | None = "DEFAULT", **kwargs: Any) -> "Engine":
        """An engine on a named model (resnet50, densenet121, vgg16, inception_v3, efficientnet_b0,
        convnext_tiny, mobilenet_v3_large, resnet18, efficientnet_lite0); see :func:`wcam.engine.models.load_model`
        for ``weights``. The model is built here and owned by the engine (eval mode, frozen parameters)."""
        built = load_model(name, weights)
        kwargs.setdefault("preprocess", built.preprocess)
        kwargs.setdefault("categories", built.categories)
        return cls(built.model, **kwargs)

    def layers_for(self, method: str = "winsor", layers: Sequence[str] | None = None) -> list[str]:
        """The layers a call with this ``method`` and ``layers`` explains (validated, in order)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if layers is None:
            return [self.gradcam_layer] if method == "gradcam" else list(self.layers)
        if isinstance(layers, str):
            layers = [layers]
        if method == "gradcam" and len(layers) != 1:
            raise ValueError(f"gradcam explains exactly one layer, got {len(layers)}")
        return resolve_layers(self.model, layers)

    def explain(
        self,
        images: Any,
        targets: Any = None,
        p: float = 90.0,
        method: str = "winsor",
        layers: Sequence[str] | None = None,
    ) -> Explanation:
        """Explain a batch of images.

        ``images``: a normalised float tensor ``B x 3 x H x W``, or PIL images / uint8 arrays that are
        preprocessed with the model's transform. ``targets``: one class per image (an int for all), default
        the argmax of the same forward pass. ``method``: ``"winsor"`` at percentile ``p``, ``"gradcam"`` (one
        layer, default the model's last Conv2d) or ``"layer_mean"`` (unweighted mean of all layer maps).
        ``layers`` overrides the engine's layer set for this call.
        """
        p = check_percentile(p)
        names = self.layers_for(method, layers)
        batch, sizes = self.preprocess(images, self.device, self.dtype)
        result = self._runner.run(batch, names, targets)
        maps = group_maps(result.cams, result.scores)
        broken = ~torch.isfinite(maps.scores)
        if bool(broken.any()):
            image, layer = (int(i) for i in broken.nonzero()[0])
            raise FloatingPointError(f"NaN or Inf gradients at layer {names[layer]!r} for image {image}")
        return Explanation.build(
            maps,
            method=method,
            p=p,
            selected=range(len(names)),
            out_size=tuple(batch.shape[-2:]),
            interpolation=self.interpolation,
            logits=result.logits,
            targets=result.targets,
            layer_names=names,
            image_sizes=sizes,
        )
