"""Per-layer Grad-CAM maps and layer scores for a whole batch (spec steps 3-6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from wcam.kernels.resample import normalize_maps


@dataclass(frozen=True, eq=False)
class LayerMaps:
    """Normalised layer maps grouped by spatial size, plus the layer scores.

    ``groups`` maps a spatial size ``(h, w)`` to ``(indices, maps)``: the positions of those layers in the
    layer list and their maps, ``B x len(indices) x h x w``, each min-max normalised to [0, 1].
    ``scores`` is ``B x L``: the mean gradient of each layer, clamped at 0.
    """

    groups: dict[tuple[int, int], tuple[list[int], Tensor]]
    scores: Tensor

    @property
    def num_layers(self) -> int:
        return self.scores.shape[1]


def layer_maps(activations: Sequence[Tensor], gradients: Sequence[Tensor]) -> LayerMaps:
    """Grad-CAM map and score of every layer, for every image of the batch.

    For layer l with activation A and gradient G (``B x C x h x w``):
    ``alpha[b, k] = mean_uv G[b, k]``, ``M[b] = ReLU(sum_k alpha[b, k] A[b, k])`` then min-max normalised
    per image (a constant map becomes zeros), and ``score[b] = max(mean_k alpha[b, k], 0)``.
    The channel contraction runs once per layer (a batched matrix-vector product over the tensors where
    they already live); everything after it runs once per distinct spatial size.
    """
    if len(activations) != len(gradients) or not activations:
        raise ValueError(f"need one gradient per activation, got {len(activations)} and {len(gradients)}")
    raw: dict[tuple[int, int], tuple[list[int], list[Tensor]]] = {}
    scores = []
    for index, (act, grad) in enumerate(zip(activations, gradients)):
        batch, channels, h, w = act.shape
        dtype = torch.promote_types(act.dtype, torch.float32)  # fp16/bf16 accumulate in fp32
        alpha = grad.to(dtype).mean(dim=(2, 3))  # B x C
        cam = torch.bmm(alpha.unsqueeze(1), act.to(dtype).reshape(batch, channels, h * w))  # B x 1 x hw
        indices, maps = raw.setdefault((h, w), ([], []))
        indices.append(index)
        maps.append(cam.view(batch, h, w))
        scores.append(alpha.mean(dim=1))
    groups = {
        size: (indices, normalize_maps(torch.stack(maps, dim=1).relu_()))
        for size, (indices, maps) in raw.items()
    }
    return LayerMaps(groups=groups, scores=torch.stack(scores, dim=1).clamp_(min=0))
