"""Benchmark cases shared by the pytest-benchmark suite and the interleaved ratio script.

The floor is what no CAM library can avoid: one forward and the gradients of the target logits w.r.t. the
same conv outputs the engine hooks (plain forward hooks, ``torch.autograd.grad``), nothing else.
"""

from __future__ import annotations

from typing import Callable

import torch

from wcam import Engine


def floor_fn(engine: Engine, images: torch.Tensor) -> Callable[[], object]:
    """Bare forward + activation gradients for ``engine``'s model and layers."""
    modules = [engine.model.get_submodule(name) for name in engine.layers]

    def run() -> object:
        outputs: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in modules]
        try:
            with torch.enable_grad():
                logits = engine.model(images.detach().requires_grad_(True))
                target = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                return torch.autograd.grad(target, outputs)
        finally:
            for handle in handles:
                handle.remove()

    return run


def engine_fn(engine: Engine, images: torch.Tensor, method: str = "winsor") -> Callable[[], object]:
    """The full engine call: forward, gradients and the CAM maths to normalised heatmaps."""
    return lambda: engine.explain(images, p=90.0, method=method)


def with_p_fn(engine: Engine, images: torch.Tensor) -> Callable[[], object]:
    """Re-weighting cached layer maps for a new p (no network pass)."""
    explanation = engine.explain(images, p=90.0)
    return lambda: explanation.with_p(50.0)


def make_engine(name: str) -> Engine:
    """A named model: the packaged pretrained weights for efficientnet_lite0, random weights otherwise
    (the timing does not depend on the weights' values and nothing is downloaded)."""
    return Engine.from_name(name, weights="DEFAULT" if name == "efficientnet_lite0" else None)


def make_images(batch: int, size: int = 224) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
