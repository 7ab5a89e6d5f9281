"""Which implementation of the CAM maths runs: the vectorised torch path or the fused Triton kernels.

``auto`` (the default) picks Triton for CUDA tensors when Triton imports, and torch otherwise. The
``WCAM_KERNELS`` environment variable (``triton``, ``torch`` or ``auto``) sets the default, and an explicit
choice (``Engine(kernels=...)``) overrides both. ``WCAM_KERNELS=triton TRITON_INTERPRET=1`` runs the whole
engine through the Triton kernels on a CPU, through Triton's interpreter (for tests: slow).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterable, Sequence

import torch
from torch import Tensor

from wcam.kernels.blend import blend_each, check_frames
from wcam.kernels.frames import Plane, YUVFrames, frame_planes
from wcam.kernels.layer_maps import LayerMaps, layer_maps
from wcam.kernels.resample import normalize_maps, resample, weighted_sum
from wcam.kernels.winsor import winsor_weights

KERNELS = ("auto", "triton", "torch")

Groups = Iterable[tuple[tuple[int, int], list[int], Tensor]]


class TorchKernels:
    """The vectorised torch path: runs on any device, and is the reference for the Triton kernels."""

    name = "torch"

    def layer_maps(self, activations: Sequence[Tensor], gradients: Sequence[Tensor]) -> LayerMaps:
        return layer_maps(activations, gradients)

    def winsor_weights(self, scores: Tensor, p: float | Tensor, mask: Tensor | None = None) -> Tensor:
        return winsor_weights(scores, p, mask)

    def weighted_sum(
        self, groups: Groups, weights: Tensor, out_size: tuple[int, int], interpolation: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(S at (h*, w*), S at out_size, S at out_size min-max normalised)``."""
        star, sums = weighted_sum(groups, weights, out_size, interpolation)
        return star, sums, normalize_maps(sums)

    def render(
        self,
        star: Tensor,
        out_size: tuple[int, int],
        interpolation: str,
        frames: Tensor | YUVFrames | None = None,
        alpha: float = 0.5,
        lut: Tensor | None = None,
        out: Tensor | YUVFrames | None = None,
    ) -> Tensor | YUVFrames:
        """Normalised heatmaps at ``out_size`` from sums S* at the layer size, or ``frames`` (``B x H x W x 3``
        uint8 RGB, or :class:`YUVFrames`) with them blended in, coloured by ``lut`` (256 x 3 uint8 RGB), into
        new frames or ``out`` (frames like ``frames``, which may be ``frames`` itself)."""
        if frames is None:
            return normalize_maps(resample(star, out_size, interpolation))
        planes, colours, targets, result = _blend_target(star, out_size, frames, lut, out)
        repeated = [False, *(star[1:] == star[:-1]).flatten(1).all(dim=1).tolist()]  # one host sync per batch
        heat = torch.empty(out_size, dtype=star.dtype, device=star.device)  # one buffer for every frame's map

        def heatmap(i: int) -> Tensor:
            return normalize_maps(resample(star[i], out_size, interpolation, out=heat), out=heat)

        blend_each(heatmap, repeated, planes, colours, alpha, targets)
        return result


class TritonKernels(TorchKernels):
    """The fused Triton kernels (:mod:`wcam.kernels.triton`): a fixed number of launches per batch."""

    name = "triton"

    def __init__(self) -> None:
        from wcam.kernels.triton import layer_maps as maps_op
        from wcam.kernels.triton import resample as resample_op
        from wcam.kernels.triton import winsor as winsor_op

        self._maps, self._resample, self._winsor = maps_op, resample_op, winsor_op

    def layer_maps(self, activations: Sequence[Tensor], gradients: Sequence[Tensor]) -> LayerMaps:
        with on_device(activations[0].device if activations else None):
            return self._maps.layer_maps(activations, gradients)

    def winsor_weights(self, scores: Tensor, p: float | Tensor, mask: Tensor | None = None) -> Tensor:
        with on_device(scores.device):
            return self._winsor.winsor_weights(scores, p, mask)

    def weighted_sum(
        self, groups: Groups, weights: Tensor, out_size: tuple[int, int], interpolation: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        with on_device(weights.device):
            return self._resample.weighted_sum(groups, weights, out_size, interpolation)

    def render(
        self,
        star: Tensor,
        out_size: tuple[int, int],
        interpolation: str,
        frames: Tensor | YUVFrames | None = None,
        alpha: float = 0.5,
        lut: Tensor | None = None,
        out: Tensor | YUVFrames | None = None,
    ) -> Tensor | YUVFrames:
        with on_device(star.device):
            if frames is None:
                return self._resample.render(star, out_size, interpolation)
            planes, colours, targets, result = _blend_target(star, out_size, frames, lut, out)
            self._resample.blend(star, out_size, interpolation, planes, colours, alpha, targets)
            return result


def on_device(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Triton launches on torch's current CUDA device and stream: for tensors on another GPU (an engine on
    ``cuda:1``) that device is made current for the launches, as torch's own ops do for their tensors."""
    return torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()


def _blend_target(
    star: Tensor, out_size: tuple[int, int], frames: Tensor | YUVFrames, lut: Tensor | None, out: Tensor | YUVFrames | None
) -> tuple[list[Plane], list[Tensor], list[Tensor], Tensor | YUVFrames]:
    """Checks ``frames`` against the heatmaps' shape and ``out`` against ``frames``, and returns the frames'
    planes and colours, the output planes, and the output they make up (``out``, or new frames)."""
    shape = (star.shape[0], *out_size)
    if isinstance(frames, YUVFrames):
        if frames.shape != shape:
            raise ValueError(f"YUV frames of shape {frames.shape} do not match the heatmaps' {shape}")
        result: Tensor | YUVFrames = frames.like(torch.empty_like(frames.data)) if out is None else out
        if not isinstance(result, YUVFrames) or result.data.shape != frames.data.shape or result.chroma != frames.chroma:
            raise ValueError("out must be YUV frames of the same size and layout as the frames")
        targets = [plane for plane, _ in result.planes()]
    else:
        check_frames(frames, shape)
        result = torch.empty(frames.shape, dtype=torch.uint8, device=frames.device) if out is None else out
        if not isinstance(result, Tensor) or result.shape != frames.shape or result.dtype != torch.uint8:
            raise ValueError(f"out must be uint8 {' x '.join(map(str, frames.shape))} like the frames")
        targets = [result]
    if any(not target[0].is_contiguous() for target in targets):
        raise ValueError("out must hold each image's planes contiguously")
    if lut is None or lut.shape != (256, 3) or lut.dtype != torch.uint8:
        raise ValueError("blending needs a 256 x 3 uint8 colour table")
    planes, colours = frame_planes(frames, lut)
    return planes, colours, targets, result


def select_kernels(choice: str | None, device: torch.device) -> TorchKernels:
    """The kernels for tensors on ``device``: ``choice`` if given, else ``$WCAM_KERNELS``, else ``auto``."""
    choice = choice if choice is not None else os.environ.get("WCAM_KERNELS", "auto")
    if choice not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS} (argument or WCAM_KERNELS), got {choice!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and has_triton else "torch"
    if choice == "torch":
        return TorchKernels()
    if not has_triton:
        raise RuntimeError("kernels='triton' needs Triton: pip install -e '.[triton]' in wcam's clone")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the Triton kernels run on CUDA tensors, or on the CPU under TRITON_INTERPRET=1 (set before Triton "
            f"is imported); got {device.type} tensors"
        )
    return TritonKernels()
