"""Winsorised layer weights for every image in one launch (spec steps 7-8).

One program per image, in fp64. With P the masked layers whose score is > 0 and n = |P|, each score's rank in
P (ties broken by layer index) is counted by comparing it with every other score, block by block, so no sort
is needed; ``tau`` is the linear interpolation between the scores of rank ``floor(r)`` and ``ceil(r)`` with
``r = (p / 100)(n - 1)`` (numpy's default quantile), ``t = min(s, tau)`` on P and the weights are
``0.1 + 0.9 (t - min t) / (max t - min t)``, 1 when all t are equal, 0 outside P. p = 0 needs no branch:
tau is then the smallest positive score and every weight is 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from wcam.kernels.triton.ieee import divide
from wcam.kernels.winsor import check_percentile, layer_mask

# Scores compared per step: a BLOCK_L x BLOCK_J tile of fp64 comparisons, held to 4096 elements (32 per thread
# of 4 warps): at 32 columns, 1024 layers spilled 3.5 KB per thread on sm_90 (tests/triton_compile.py --ptxas-info)
TILE = 4096


@triton.jit(do_not_specialize=["num_layers"])
def _winsor_kernel(scores, mask, q, weights, num_layers, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr):
    """weights[b, :] from scores[b, :] (>= 0), the layer mask (int8) and q = p / 100 (fp64)."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_L)
    valid = i < num_layers
    s = tl.load(scores + b * num_layers + i, mask=valid, other=0.0).to(tl.float64)
    positive = valid & (tl.load(mask + i, mask=valid, other=0) != 0) & (s > 0)
    key = tl.where(positive, s, float("inf"))
    rank = tl.zeros([BLOCK_L], dtype=tl.int32)
    for j0 in range(0, num_layers, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        inside = j < num_layers
        sj = tl.load(scores + b * num_layers + j, mask=inside, other=0.0).to(tl.float64)
        pj = inside & (tl.load(mask + j, mask=inside, other=0) != 0) & (sj > 0)
        kj = tl.where(pj, sj, float("inf"))
        before = (kj[None, :] < key[:, None]) | ((kj[None, :] == key[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & inside[None, :]).to(tl.int32), axis=1)
    count = tl.sum(positive.to(tl.int32), axis=0)
    r = tl.load(q) * tl.maximum(count - 1, 0).to(tl.float64)
    below = r.to(tl.int32)
    above = below + (r > below.to(tl.float64)).to(tl.int32)
    low = tl.sum(tl.where(positive & (rank == below), s, 0.0), axis=0)
    high = tl.sum(tl.where(positive & (rank == above), s, 0.0), axis=0)
    tau = low + (r - below.to(tl.float64)) * (high - low)
    t = tl.where(positive, tl.minimum(s, tau), 0.0)
    t_min = tl.min(tl.where(positive, t, float("inf")), axis=0)
    spread = tl.max(tl.where(positive, t, float("-inf")), axis=0) - t_min
    scaled = 0.1 + divide(0.9 * (t - t_min), tl.where(spread > 0, spread, 1.0))
    w = tl.where(positive, tl.where(spread > 0, scaled, 1.0), 0.0)
    tl.store(weights + b * num_layers + i, w.to(weights.dtype.element_ty), mask=valid)


def winsor_weights(scores: Tensor, p: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """Triton twin of :func:`wcam.kernels.winsor_weights` (same arguments, same result), one launch."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be B x L, got shape {tuple(scores.shape)}")
    batch, count = scores.shape
    if isinstance(p, Tensor):
        q = p.detach().to(device=scores.device, dtype=torch.float64).clamp(0.0, 100.0).reshape(1) / 100.0
    else:
        q = torch.full((1,), check_percentile(p) / 100.0, dtype=torch.float64, device=scores.device)
    keep = (
        torch.ones(count, dtype=torch.int8, device=scores.device)
        if mask is None
        else layer_mask(mask, count, scores.device).to(torch.int8)
    )
    scores = scores.contiguous()
    weights = torch.empty_like(scores)
    block = max(triton.next_power_of_2(count), 16)
    _winsor_kernel[(batch,)](scores, keep, q, weights, count, BLOCK_L=block, BLOCK_J=max(2, min(32, TILE // block)))
    return weights
