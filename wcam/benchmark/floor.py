"""The floor every gradient-based CAM pays: one forward and the gradients of the target logits with respect
to the hooked layer outputs (``torch.autograd.grad``, so the backward stops at the earliest hooked layer and
no parameter gradient is computed), nothing else."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn


def floor(model: nn.Module, layers: Sequence[str]) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """A function of a normalised batch returning the gradients of each image's argmax logit w.r.t. the
    outputs of ``layers``; its hooks live only during each call."""
    modules = [model.get_submodule(name) for name in layers]

    def run(images: Tensor) -> tuple[Tensor, ...]:
        outputs: list[Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in modules]
        try:
            with torch.enable_grad():
                logits = model(images.detach().requires_grad_(True))
                return torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), outputs)
        finally:
            for handle in handles:
                handle.remove()

    return run
