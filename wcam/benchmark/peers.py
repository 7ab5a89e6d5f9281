"""The CAM libraries users pick today, each wrapped as a function of a normalised batch that returns
``B x H x W`` heatmaps at the input size, normalised per image to [0, 1], as wcam's are.

Each call builds the library's extractor and releases it (hooks live only during the call), so that no
peer's hooks fire while another entry runs on the same model. The peers get the engine's model (eval mode,
frozen parameters) and an input that requires grad, in the memory order the floor gets (channels-last on
a CPU, which runs their network faster too): the most favourable set-up for them. One more row runs
pytorch-grad-cam as its users typically call it, on a model as torchvision builds it (trainable parameters,
in eval mode), where its ``loss.backward()`` also computes every parameter gradient.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from wcam.kernels.resample import normalize_maps, resample

Heatmaps = Callable[[], Tensor]


@dataclass(frozen=True)
class Peer:
    """One peer entry: its row label, the PyPI package that provides it, which wcam method computes the same
    thing (for the agreement column), and how to build it for a model and layer set."""

    label: str
    package: str
    module: str
    same_as: str
    build: Callable[[nn.Module, Sequence[str], str, Tensor], Heatmaps]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _normalised(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``B x h x w`` maps resized (bilinear) to ``size`` and min-max normalised per image (0 if constant)."""
    return normalize_maps(resample(maps.float(), size, "bilinear"))


def _grad_cam(model: nn.Module, layers: Sequence[str], images: Tensor, input_grad: bool = True) -> Heatmaps:
    """pytorch-grad-cam's ``GradCAM`` on ``layers``: with several layers, its per-layer maps are ReLU'd,
    resized, normalised and averaged (the library's multi-layer aggregation). Class: the argmax."""
    from pytorch_grad_cam import GradCAM

    modules = [model.get_submodule(name) for name in layers]
    given = images.detach().requires_grad_(input_grad)

    def run() -> Tensor:
        with GradCAM(model=model, target_layers=modules) as cam:
            maps = cam(input_tensor=given, targets=None)
        return torch.from_numpy(maps)

    return run


def _grad_cam_all(model: nn.Module, layers: Sequence[str], _last: str, images: Tensor) -> Heatmaps:
    return _grad_cam(model, layers, images)


def _grad_cam_trainable(model: nn.Module, layers: Sequence[str], _last: str, images: Tensor) -> Heatmaps:
    """pytorch-grad-cam on all ``layers`` of a copy of the model whose parameters require grad (made here,
    untimed), given a plain input: its default use."""
    return _grad_cam(copy.deepcopy(model).requires_grad_(True), layers, images, input_grad=False)


def _grad_cam_last(model: nn.Module, _layers: Sequence[str], last: str, images: Tensor) -> Heatmaps:
    return _grad_cam(model, [last], images)


def _torchcam(model: nn.Module, _layers: Sequence[str], last: str, images: Tensor) -> Heatmaps:
    """torchcam's ``GradCAM`` on the last conv layer, class = the argmax of the same forward."""
    from torchcam.methods import GradCAM

    def run() -> Tensor:
        with GradCAM(model, target_layer=last) as extractor:
            with torch.enable_grad():
                scores = model(images.detach().requires_grad_(True))
            (maps,) = extractor(scores.argmax(1).tolist(), scores)
        return _normalised(maps, tuple(images.shape[-2:]))

    return run


def _captum(model: nn.Module, _layers: Sequence[str], last: str, images: Tensor) -> Heatmaps:
    """captum's ``LayerGradCam`` on the last conv layer (ReLU'd), resized with captum's own interpolation.
    Captum needs the target before its forward: it is given the argmax, computed here (untimed)."""
    from captum.attr import LayerAttribution, LayerGradCam

    layer = model.get_submodule(last)
    with torch.no_grad():
        targets = model(images).argmax(1)

    def run() -> Tensor:
        attribution = LayerGradCam(model, layer).attribute(
            images.detach().requires_grad_(True), target=targets, relu_attributions=True
        )
        resized = LayerAttribution.interpolate(attribution, tuple(images.shape[-2:]), "bilinear")
        return _normalised(resized[:, 0], tuple(images.shape[-2:]))

    return run


PEERS = (
    Peer("grad-cam GradCAM, all conv layers", "grad-cam", "pytorch_grad_cam", "layer_mean", _grad_cam_all),
    Peer("grad-cam GradCAM, all conv layers, trainable model", "grad-cam", "pytorch_grad_cam", "layer_mean",
         _grad_cam_trainable),
    Peer("grad-cam GradCAM, last conv", "grad-cam", "pytorch_grad_cam", "gradcam", _grad_cam_last),
    Peer("torchcam GradCAM, last conv", "torchcam", "torchcam", "gradcam", _torchcam),
    Peer("captum LayerGradCam, last conv", "captum", "captum", "gradcam", _captum),
)
PACKAGES = tuple(dict.fromkeys(peer.package for peer in PEERS))
