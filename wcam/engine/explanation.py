"""The result of an explanation, and re-weighting of its cached layer maps for a new p (no network pass)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from wcam.engine.layers import as_index, select_layers
from wcam.kernels import LayerMaps, check_percentile
from wcam.kernels.dispatch import TorchKernels
from wcam.kernels.transfer import to_device

METHODS = ("winsor", "gradcam", "layer_mean")


def combine(
    maps: LayerMaps,
    method: str,
    p: float | Tensor,
    selected: Sequence[int],
    out_size: tuple[int, int],
    interpolation: str,
    kernels: TorchKernels,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 7-10 on cached layer maps with ``kernels``:
    ``(layer weights B x L, S at (h*, w*), S at out_size, normalised S at out_size)``.

    ``winsor`` weights by winsorised scores; ``layer_mean`` gives every selected layer 1/L (a plain mean);
    ``gradcam`` needs exactly one selected layer, weight 1. Layers outside ``selected`` get weight 0 and do
    not take part in the quantile or in choosing (h*, w*).
    """
    scores = maps.scores
    mask = torch.zeros(maps.num_layers, dtype=torch.bool)
    mask[list(selected)] = True
    mask = to_device(mask, scores.device)
    if method == "winsor":
        weights = kernels.winsor_weights(scores, p, mask)
    elif method == "layer_mean":
        weights = (mask.to(scores.dtype) / len(selected)).expand_as(scores).contiguous()
    elif method == "gradcam":
        if len(selected) != 1:
            raise ValueError(f"gradcam explains one layer, got {len(selected)}")
        weights = mask.to(scores.dtype).expand_as(scores).contiguous()
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    chosen = set(selected)
    groups = []
    for size, (indices, group_maps) in maps.groups.items():
        keep = [k for k, i in enumerate(indices) if i in chosen]
        if keep:
            kept = group_maps if len(keep) == len(indices) else group_maps[:, keep]
            groups.append((size, [indices[k] for k in keep], kept))
    star, sums, heatmaps = kernels.weighted_sum(groups, weights, out_size, interpolation)
    return weights, star, sums, heatmaps


@dataclass(frozen=True, eq=False)
class Explanation:
    """Heatmaps for a batch, with everything that produced them.

    ``heatmaps`` (B x H x W, min-max normalised to [0, 1]) and ``sums`` (the raw weighted sums S) are at the
    network input size; ``heatmap(i)`` renders image i at its original size (or any size) from the sum at
    the largest layer size. ``layer_scores`` and ``layer_weights`` are B x L in ``layer_names`` order.
    """

    heatmaps: Tensor
    sums: Tensor
    logits: Tensor
    targets: Tensor
    layer_names: list[str]
    layer_scores: Tensor
    layer_weights: Tensor
    method: str
    p: float
    interpolation: str
    image_sizes: list[tuple[int, int]]
    layer_maps: LayerMaps = field(repr=False)
    sums_at_layer_size: Tensor = field(repr=False)
    selected_layers: list[int] = field(repr=False)
    kernels: TorchKernels = field(repr=False)

    @classmethod
    def build(
        cls,
        maps: LayerMaps,
        *,
        method: str,
        p: float,
        selected: Sequence[int],
        out_size: tuple[int, int],
        interpolation: str,
        logits: Tensor,
        targets: Tensor,
        layer_names: list[str],
        image_sizes: list[tuple[int, int]],
        kernels: TorchKernels,
    ) -> "Explanation":
        weights, star, sums, heatmaps = combine(maps, method, p, selected, out_size, interpolation, kernels)
        return cls(
            heatmaps=heatmaps,
            sums=sums,
            logits=logits,
            targets=targets,
            layer_names=list(layer_names),
            layer_scores=maps.scores,
            layer_weights=weights,
            method=method,
            p=float(p),
            interpolation=interpolation,
            image_sizes=list(image_sizes),
            layer_maps=maps,
            sums_at_layer_size=star,
            selected_layers=list(selected),
            kernels=kernels,
        )

    def __len__(self) -> int:
        return self.heatmaps.shape[0]

    def image(self, index: int, copy: bool = False) -> "Explanation":
        """Image ``index`` alone, as a batch of one: views of this explanation's tensors, which keep the whole
        batch's alive; with ``copy``, tensors of its own (what a caller that keeps it needs)."""
        i = range(len(self))[index]

        def one(t: Tensor) -> Tensor:
            return t[i : i + 1].clone() if copy else t[i : i + 1]

        maps = LayerMaps(
            groups={size: (indices, one(m)) for size, (indices, m) in self.layer_maps.groups.items()},
            scores=one(self.layer_maps.scores),
        )
        return Explanation(
            heatmaps=one(self.heatmaps),
            sums=one(self.sums),
            logits=one(self.logits),
            targets=one(self.targets),
            layer_names=self.layer_names,
            layer_scores=maps.scores,  # one tensor, as in build()
            layer_weights=one(self.layer_weights),
            method=self.method,
            p=self.p,
            interpolation=self.interpolation,
            image_sizes=[self.image_sizes[i]],
            layer_maps=maps,
            sums_at_layer_size=one(self.sums_at_layer_size),
            selected_layers=self.selected_layers,
            kernels=self.kernels,
        )

    @property
    def probabilities(self) -> Tensor:
        """Softmax of the logits (B x K)."""
        return torch.softmax(self.logits.float(), dim=1)

    def with_p(self, p: float, layers: object = None) -> "Explanation":
        """Winsor-CAM at a new percentile ``p`` from the cached layer maps: no forward or backward pass.

        ``layers`` optionally restricts it to a subset of the explained layers (a ``slice`` such as
        ``slice(10, 40)`` for a contiguous range, or names or indices); winsorisation then runs over that
        subset only, exactly as if only those layers had been explained.
        """
        p = check_percentile(p)  # a number: a tensor p is the exported graph's input, clamped, never checked
        selected = self.selected_layers if layers is None else select_layers(self.layer_names, layers)
        return Explanation.build(
            self.layer_maps,
            method="winsor",
            p=p,
            selected=selected,
            out_size=tuple(self.heatmaps.shape[-2:]),
            interpolation=self.interpolation,
            logits=self.logits,
            targets=self.targets,
            layer_names=self.layer_names,
            image_sizes=self.image_sizes,
            kernels=self.kernels,
        )

    def heatmap(self, index: int, size: tuple[int, int] | None = None) -> Tensor:
        """Normalised heatmap of image ``index`` at ``size`` (default: the image's original size)."""
        i = range(len(self))[index]  # negative indices as for a list; out of range: IndexError
        size = self.image_sizes[i] if size is None else _output_size(size)
        return self.kernels.render(self.sums_at_layer_size[i : i + 1], size, self.interpolation)[0]


def _output_size(size: object) -> tuple[int, int]:
    """``(height, width)`` as two positive ints, or a ValueError that names what was given."""
    try:  # a tuple or list, or a numpy array or tensor of two ints
        values = [] if isinstance(size, (str, bytes)) else [as_index(v) for v in size]
    except TypeError:  # not iterable
        values = []
    if len(values) != 2 or any(v is None or v <= 0 for v in values):
        raise ValueError(f"size must be (height, width), two positive ints, got {size!r}")
    return values[0], values[1]
