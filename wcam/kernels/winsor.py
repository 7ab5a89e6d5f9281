"""Winsorised layer weights (spec steps 7-8), vectorised over the batch."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_percentile(p: object) -> float:
    """``p`` as a float if it is a real number in [0, 100] (bools refused), else a ValueError naming it."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) <= 100.0):
        raise ValueError(f"p must be a number in [0, 100], got {p!r}")
    return float(p)


def layer_mask(mask: Tensor, count: int, device: torch.device) -> Tensor:
    """``mask`` as ``count`` contiguous bools on ``device`` (non-zero: the layer is in), else a ValueError."""
    if not isinstance(mask, Tensor) or mask.shape != (count,):
        raise ValueError(f"the layer mask must be {count} bools, one per layer, got {getattr(mask, 'shape', mask)!r}")
    return mask.to(device=device, dtype=torch.bool).contiguous()


def winsor_weights(scores: Tensor, p: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """Layer weights in [0.1, 1] (0 for layers with no positive score) from scores clamped at a percentile.

    ``scores`` is ``B x L`` (already >= 0); ``mask`` (``L`` bools) restricts the computation to a subset of
    layers, the others get weight 0. Per image, with P the masked layers whose score is > 0:
    ``tau = quantile({s_l : l in P}, p / 100)`` (linear interpolation, as numpy/torch), ``t_l = min(s_l, tau)``,
    ``w_l = 0.1 + 0.9 (t_l - min t) / (max t - min t)``, or 1 when all t are equal. The spec's rule for
    p == 0 (``t_l = 1``) needs no branch: tau is then the smallest positive score, every t_l equals it, and
    all weights are 1. Branch-free, so ``p`` may be a 0-d tensor (a graph input; clamped to [0, 100]).
    Computed in float64 (it is ``B x L`` numbers) and returned in the scores' dtype.
    """
    if isinstance(p, Tensor):
        q = p.to(device=scores.device, dtype=torch.float64).clamp(0.0, 100.0) / 100.0
    else:
        q = check_percentile(p) / 100.0
    s = scores.double()
    positive = s > 0
    if mask is not None:
        positive &= layer_mask(mask, s.shape[1], s.device).unsqueeze(0)
    count = positive.sum(dim=1, keepdim=True)
    ordered = torch.where(positive, s, math.inf).sort(dim=1).values  # positives first, ascending
    rank = q * (count - 1).clamp(min=0).double()
    below = rank.floor().long()
    above = rank.ceil().long()
    tau = torch.lerp(ordered.gather(1, below), ordered.gather(1, above), rank - below.double())
    t = torch.where(positive, torch.minimum(s, tau), 0.0)
    t_min = torch.where(positive, t, math.inf).amin(dim=1, keepdim=True)
    t_max = torch.where(positive, t, -math.inf).amax(dim=1, keepdim=True)
    spread = t_max - t_min
    scaled = 0.1 + 0.9 * (t - t_min) / torch.where(spread > 0, spread, 1.0)
    weights = torch.where(positive, torch.where(spread > 0, scaled, 1.0), 0.0)
    return weights.to(scores.dtype)
