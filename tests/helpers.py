"""Helpers shared by the test files."""

from __future__ import annotations

import numpy as np
import torch
from reference import reference_combine, reference_network
from torch import nn

from wcam import Engine

_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def hook_counts(model: nn.Module) -> dict[tuple[str, str], int]:
    """Number of hooks of every kind on every module of ``model`` (and torch's global module hooks)."""
    from torch.nn.modules import module as torch_module

    counts = {}
    for name, module in model.named_modules():
        for attr in _HOOK_ATTRS:
            hooks = getattr(module, attr, None)
            if hooks is not None:
                counts[(name, attr)] = len(hooks)
    for attr in _GLOBAL_HOOKS:
        counts[("<global>", attr)] = len(getattr(torch_module, attr, {}))
    return counts


def max_diff(a: torch.Tensor, b) -> float:
    """Largest absolute difference of two equally shaped arrays (no broadcasting: a 1 x H x W result is not
    compared with a B x H x W reference)."""
    b = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.asarray(b))
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a.double() - b.double()).abs().max())


def agrees_with_reference(model, x, targets=None, layers=None, ps=(0.0, 50.0, 90.0, 100.0), **options):
    """Engine (``Engine(model, layers=layers, **options)``) vs reference at every p: heatmaps, sums, scores,
    weights to 1e-9. Returns (engine result, net)."""
    engine = Engine(model, layers=layers, **options)
    net = reference_network(model, x, engine.layers, targets)
    first = None
    for p in ps:
        got = engine.explain(x, targets=targets, p=p)
        ref = reference_combine(net, p=p)
        assert got.targets.tolist() == net["targets"].tolist()
        assert max_diff(got.layer_scores, net["scores"]) <= 1e-9, f"p={p}"
        assert max_diff(got.layer_weights, ref["weights"]) <= 1e-9, f"p={p}"
        assert max_diff(got.heatmaps, ref["heatmaps"]) <= 1e-9, f"p={p}"
        assert max_diff(got.sums, ref["sums"]) <= 1e-9, f"p={p}"
        first = first or got
    for method in ("layer_mean",) + (("gradcam",) if len(engine.layers) == 1 else ()):
        got = engine.explain(x, targets=targets, method=method, layers=engine.layers)
        ref = reference_combine(net, method=method)
        assert max_diff(got.heatmaps, ref["heatmaps"]) <= 1e-9, method
    return first, net
