"""Independent float64 test reference for Winsor-CAM (spec: /work/shared/spec/winsor-cam.md).

This module is a deliberately plain, slow-but-clear re-implementation of the algorithm in the spec, written
without looking at or importing the production engine (``wcam``). It exists only so that tests can compare the
engine against a second, independent derivation. Design choices that keep it independent and checkable:

* it runs on a float64 deep copy of the model (the caller's model is never modified), one image at a time
  (batch 1 forward + backward per image), with the target defaulting to the argmax of that same forward pass;
* the hooked tensor is each layer's RAW output (before BatchNorm / activation / residual add). The forward hook
  stores the raw output and returns a clone, so an in-place op that follows (VGG's ``nn.ReLU(inplace=True)``)
  modifies the clone, never the stored tensor; gradients are ``torch.autograd.grad(logit, stored_raw_outputs)``,
  i.e. w.r.t. the pre-activation conv outputs, and no parameter gradients are taken;
* resampling (bilinear with ``align_corners=False`` and torch's legacy ``nearest``) is written out by hand in
  numpy float64 as separable interpolation matrices (``F.interpolate`` is NOT used here);
* the linear-interpolation quantile and the winsorised weight rule (spec steps 7-8) are written out by hand;
* step 9 is done literally: every normalised layer map is resampled to (max h, max w) over the layers, then to
  the output size, and the weighted maps are summed (weighted SUM, not a weighted mean).

Public entry point: :func:`reference_cam`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

__all__ = [
    "reference_cam",
    "reference_network",
    "reference_combine",
    "bilinear_matrix",
    "nearest_matrix",
    "resize_2d",
    "quantile_linear",
    "winsor_weights",
    "minmax",
]


# ----------------------------------------------------------------------------------------------------------
# Resampling (hand-written, float64)
# ----------------------------------------------------------------------------------------------------------

def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out x n_in) matrix R with out = R @ in, for 1-D linear interpolation, align_corners=False.

    For each output index d (torch ``area_pixel_compute_source_index`` with no explicit scale factor):
        scale = n_in / n_out
        src   = (d + 0.5) * scale - 0.5, then src = max(src, 0)
        i0    = floor(src);  i1 = i0 + 1 if i0 < n_in - 1 else i0     (neighbour clamped to the edge)
        lam   = src - i0
        out[d] = (1 - lam) * in[i0] + lam * in[i1]
    Bilinear 2-D resampling is this applied along rows and then along columns (separable).
    """
    scale = n_in / n_out
    R = np.zeros((n_out, n_in), dtype=np.float64)
    for d in range(n_out):
        src = (d + 0.5) * scale - 0.5
        if src < 0.0:
            src = 0.0
        i0 = int(math.floor(src))
        if i0 > n_in - 1:  # cannot happen for src <= n_in - 0.5, kept for safety
            i0 = n_in - 1
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        lam = src - i0
        R[d, i0] += 1.0 - lam
        R[d, i1] += lam
    return R


def nearest_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out x n_in) 0/1 matrix for torch's legacy 'nearest': src = min(floor(d * n_in / n_out), n_in - 1).

    The product is evaluated in float32, exactly as torch does (CPU and CUDA kernels both compute
    ``scale = float(n_in) / n_out`` and ``floorf(d * scale)`` in single precision). This matters: with exact
    rational arithmetic 14 -> 46 would give floor(23 * 14 / 46) = 7 at d = 23, but float32(14 / 46) is slightly
    below 7/23, so torch (and this reference) pick 6.
    """
    scale = np.float32(n_in) / np.float32(n_out)          # float32 division, as torch
    R = np.zeros((n_out, n_in), dtype=np.float64)
    for d in range(n_out):
        prod = np.float32(d) * scale                       # float32 product, as torch
        src = min(int(np.floor(prod)), n_in - 1)
        R[d, src] = 1.0
    return R


def resize_2d(m: np.ndarray, out_hw: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resample a 2-D float64 map to out_hw = (H, W): out = Ry @ m @ Rx.T (separable)."""
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    H, W = int(out_hw[0]), int(out_hw[1])
    if mode == "bilinear":
        Ry, Rx = bilinear_matrix(h, H), bilinear_matrix(w, W)
    elif mode == "nearest":
        Ry, Rx = nearest_matrix(h, H), nearest_matrix(w, W)
    else:
        raise ValueError(f"unknown interpolation {mode!r} (use 'bilinear' or 'nearest')")
    return Ry @ m @ Rx.T


# ----------------------------------------------------------------------------------------------------------
# Normalisation, quantile, weights (spec steps 5, 7, 8)
# ----------------------------------------------------------------------------------------------------------

def minmax(m: np.ndarray) -> np.ndarray:
    """(m - min) / (max - min); a constant map (max == min) becomes all zeros."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = m.min(), m.max()
    if hi == lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def quantile_linear(values, q: float) -> float:
    """Quantile with linear interpolation (numpy's default 'linear' method), written out by hand.

    v = sorted(values); pos = q * (n - 1); i = floor(pos); j = min(i + 1, n - 1);
    result = v[i] + (pos - i) * (v[j] - v[i]).
    """
    v = sorted(float(x) for x in values)
    n = len(v)
    if n == 0:
        raise ValueError("quantile of an empty set")
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be in [0, 1]")
    pos = q * (n - 1)
    i = int(math.floor(pos))
    j = min(i + 1, n - 1)
    frac = pos - i
    return v[i] + frac * (v[j] - v[i])


def winsor_weights(scores, p: float) -> np.ndarray:
    """Spec steps 7-8 on already-clamped scores s_l = max(s_l, 0).

    P = {l : s_l > 0}. P empty -> all weights 0. p == 0 -> t_l = 1 on P. Otherwise
    tau = quantile_linear({s_l : l in P}, p / 100) and t_l = min(s_l, tau) on P.
    On P: w_l = 0.1 + 0.9 * (t_l - min_P t) / (max_P t - min_P t), or w_l = 1 on all of P when
    max_P t == min_P t (exact equality). Outside P: w_l = 0.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not 0.0 <= p <= 100.0:
        raise ValueError("p must be in [0, 100]")
    w = np.zeros_like(s)
    pos_idx = [i for i in range(len(s)) if s[i] > 0.0]
    if not pos_idx:
        return w
    if p == 0:
        t = {i: 1.0 for i in pos_idx}
    else:
        tau = quantile_linear([s[i] for i in pos_idx], p / 100.0)
        t = {i: min(float(s[i]), tau) for i in pos_idx}
    t_min = min(t.values())
    t_max = max(t.values())
    for i in pos_idx:
        if t_max == t_min:
            w[i] = 1.0
        else:
            w[i] = 0.1 + 0.9 * (t[i] - t_min) / (t_max - t_min)
    return w


# ----------------------------------------------------------------------------------------------------------
# Per-image network pass (spec steps 1-6)
# ----------------------------------------------------------------------------------------------------------

def _layer_maps_one_image(model64, modules, image64, target):
    """Forward + backward for ONE image (1 x 3 x H x W, float64).

    Returns (logits [K], target, list of native normalised maps M_l, raw scores s_l (before max(., 0)),
    list of (activation, gradient) float64 arrays per layer).
    """
    stored: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(idx):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {idx}: output is not a tensor")
            if idx in stored:
                raise RuntimeError(f"layer {idx} was called more than once in one forward pass")
            stored[idx] = output        # raw conv output, kept intact
            return output.clone()       # downstream (possibly in-place) ops act on the clone
        return hook

    for idx, mod in enumerate(modules):
        handles.append(mod.register_forward_hook(make_hook(idx)))
    try:
        with torch.enable_grad():
            logits = model64(image64)
        if logits.dim() != 2 or logits.shape[0] != 1:
            raise ValueError(f"expected logits of shape 1 x K, got {tuple(logits.shape)}")
        logits_np = logits.detach().cpu().numpy()[0].astype(np.float64)
        if target is None:
            target = int(np.argmax(logits_np))
        y = logits[0, int(target)]                           # step 1: raw logit
        missing = [i for i in range(len(modules)) if i not in stored]
        if missing:
            raise RuntimeError(f"layers {missing} were not executed in the forward pass")
        acts = [stored[i] for i in range(len(modules))]
        grads = torch.autograd.grad(y, acts, allow_unused=True)  # step 2: only activation grads
    finally:
        for h in handles:
            h.remove()

    maps, raw_scores, tensors = [], [], []
    for a_t, g_t in zip(acts, grads):
        A = a_t.detach().cpu().numpy()[0].astype(np.float64)          # C x h x w
        if A.ndim != 3:
            raise ValueError(f"hooked activation must be N x C x h x w, got {tuple(a_t.shape)}")
        G = np.zeros_like(A) if g_t is None else g_t.detach().cpu().numpy()[0].astype(np.float64)
        tensors.append((A, G))
        alpha = G.mean(axis=(1, 2))                                    # step 3: C
        cam = np.maximum(np.tensordot(alpha, A, axes=(0, 0)), 0.0)     # step 4: h x w, ReLU after sum
        maps.append(minmax(cam))                                       # step 5
        raw_scores.append(float(alpha.mean()))                         # step 6 (before max(., 0))
    return logits_np, int(target), maps, raw_scores, tensors


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------

def reference_network(model: torch.nn.Module, images: torch.Tensor, layer_names: list[str],
                      targets: list[int] | None = None) -> dict:
    """Spec steps 1-6 for every image, one image at a time, on a float64 copy of the model.

    Returns {"logits": B x K, "targets": B, "scores": B x L (max(s_l, 0)), "maps": list (B) of lists (L) of the
    native-resolution normalised maps M_l, "activations"/"gradients": per layer B x C x h x w arrays}, to be
    combined by :func:`reference_combine` at any p.
    """
    layer_names = list(layer_names)
    if not layer_names:
        raise ValueError("layer_names is empty")
    if images.dim() != 4:
        raise ValueError("images must be B x C x H x W")
    B = images.shape[0]
    if targets is not None and len(targets) != B:
        raise ValueError("targets must have one entry per image")
    model64 = copy.deepcopy(model).double().eval()
    named = dict(model64.named_modules())
    try:
        modules = [named[n] for n in layer_names]
    except KeyError as e:
        raise KeyError(f"no module named {e.args[0]!r} in the model") from None
    # the input requires grad so that a graph exists even when the model's parameters are frozen
    images64 = images.detach().to(dtype=torch.float64).requires_grad_(True)
    logits_all, targets_all, scores_all, maps_all, tensors_all = [], [], [], [], []
    for b in range(B):
        tgt = None if targets is None else int(targets[b])
        logits_np, tgt, maps, raw_scores, tensors = _layer_maps_one_image(model64, modules, images64[b:b + 1], tgt)
        tensors_all.append(tensors)
        logits_all.append(logits_np)
        targets_all.append(tgt)
        scores_all.append(np.maximum(np.asarray(raw_scores, dtype=np.float64), 0.0))  # step 6: max(s_l, 0)
        maps_all.append(maps)
    return {
        "logits": np.stack(logits_all, axis=0),
        "targets": np.asarray(targets_all, dtype=np.int64),
        "scores": np.stack(scores_all, axis=0),
        "maps": maps_all,
        "image_size": (int(images.shape[2]), int(images.shape[3])),
        # per layer, the B x C x h x w float64 activations and gradients (for testing the CAM maths alone)
        "activations": [np.stack([t[l][0] for t in tensors_all]) for l in range(len(modules))],
        "gradients": [np.stack([t[l][1] for t in tensors_all]) for l in range(len(modules))],
    }


def reference_combine(net: dict, p: float = 90.0, method: str = "winsor", interpolation: str = "bilinear",
                      out_size: tuple[int, int] | None = None) -> dict:
    """Spec steps 7-10 on the output of :func:`reference_network` (see :func:`reference_cam`)."""
    if method not in ("winsor", "gradcam", "layer_mean"):
        raise ValueError(f"unknown method {method!r}")
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"unknown interpolation {interpolation!r}")
    B, L = net["scores"].shape
    if method == "gradcam" and L != 1:
        raise ValueError("method 'gradcam' needs exactly one layer")
    H, W = out_size if out_size is not None else net["image_size"]
    heatmaps = np.zeros((B, H, W))
    sums = np.zeros((B, H, W))
    weights = np.zeros((B, L))
    for b in range(B):
        s, maps = net["scores"][b], net["maps"][b]
        if method == "winsor":
            w = winsor_weights(s, p)                                     # steps 7-8
        elif method == "gradcam":
            w = np.array([1.0])
        else:  # layer_mean
            w = np.full(L, 1.0 / L)
        # step 9, literally: each map -> (h*, w*) -> (H, W), then weighted sum
        h_star = max(m.shape[0] for m in maps)
        w_star = max(m.shape[1] for m in maps)
        S = np.zeros((H, W))
        for wl, m in zip(w, maps):
            U = resize_2d(resize_2d(m, (h_star, w_star), interpolation), (H, W), interpolation)
            S += wl * U
        heatmaps[b] = minmax(S)                                          # step 10
        sums[b] = S
        weights[b] = w
    return {
        "heatmaps": heatmaps,
        "sums": sums,
        "scores": net["scores"],
        "weights": weights,
        "targets": net["targets"],
        "logits": net["logits"],
        "maps": net["maps"],
    }


def reference_cam(model: torch.nn.Module, images: torch.Tensor, layer_names: list[str],
                  targets: list[int] | None = None, p: float = 90.0, method: str = "winsor",
                  interpolation: str = "bilinear", out_size: tuple[int, int] | None = None) -> dict:
    """Float64 reference CAM.

    method:
      "winsor"     spec steps 1-10. weights = winsorised weights of spec step 8.
      "gradcam"    Grad-CAM on the single layer in layer_names; heatmap = min-max of the resampled normalised
                   map; sums = that resampled map (unnormalised again); weights = [1.0].
      "layer_mean" unweighted mean of the normalised, resampled maps of ALL layers (score <= 0 included);
                   sums = that mean; weights = [1/L] * L (so sums == sum_l w_l U_l, as for winsor).
    For every method each map U_l is resampled literally in two steps: native -> (max h, max w) over the
    given layers -> out_size (for "gradcam" the first step is the identity).

    Returns numpy float64 arrays:
      heatmaps B x H x W (min-max of sums, zeros if constant), sums B x H x W, scores B x L (max(s_l, 0)),
      weights B x L, targets B (int64), logits B x K,
      plus "maps": list (B) of lists (L) of the native-resolution normalised maps M_l (steps 4-5).
    """
    if method == "gradcam" and len(layer_names) != 1:
        raise ValueError("method 'gradcam' needs exactly one layer")
    net = reference_network(model, images, layer_names, targets)
    return reference_combine(net, p=p, method=method, interpolation=interpolation, out_size=out_size)
