"""The joint forward + activation-gradient computation as one traceable function, and its FX graph.

``images (B x 3 x H x W), targets (B, int64; -1 = the argmax)`` -> ``(logits, targets, activations...,
gradients...)``: exactly what the eager runner computes, as a graph of aten ops (``make_fx`` with the
decompositions of :mod:`wcam.export.decompositions`) that ONNX export and ``torch.compile`` both take.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from wcam.engine.capture import LayerCapture
from wcam.engine.runner import EvalGuard, layer_cams
from wcam.export.decompositions import OP_MODULES, UnsupportedOpError, decompositions


def joint_function(
    model: nn.Module, layers: Sequence[str], copied: frozenset[str] = frozenset(), cams: bool = False
) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    """The function to trace; ``copied`` names layers whose output the next op overwrites in place.

    With ``cams`` it returns ``(logits, targets, cams..., scores...)`` of :func:`wcam.engine.runner.layer_cams`
    instead of the activations and gradients, so a compiler can fuse that maths into the graph.
    """
    names = list(layers)

    def joint(images: Tensor, targets: Tensor) -> tuple[Tensor, ...]:
        with LayerCapture(model, names, copied) as capture, torch.enable_grad():
            logits = model(images.detach().requires_grad_(True))
            chosen = torch.where(targets < 0, logits.argmax(dim=1), targets)
            activations = capture.collect()
            overwritten = capture.overwritten()
            if overwritten:
                raise _Overwritten(overwritten)
            objective = logits.gather(1, chosen.unsqueeze(1)).sum()
            if cams:
                maps, scores = layer_cams(objective, activations)
                return (logits.detach(), chosen, *maps, *scores)
            gradients = torch.autograd.grad(objective, activations, allow_unused=True)
        gradients = [torch.zeros_like(a) if g is None else g for a, g in zip(activations, gradients)]
        return (logits.detach(), chosen, *(a.detach() for a in activations), *gradients)

    return joint


class _Overwritten(Exception):
    def __init__(self, names: frozenset[str]) -> None:
        super().__init__(sorted(names))
        self.names = names


def trace_joint(
    model: nn.Module,
    layers: Sequence[str],
    size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    cams: bool = False,
    channels_last: bool = False,
) -> torch.fx.GraphModule:
    """FX graph (aten ops) of :func:`joint_function` for ``model`` in eval mode, with a symbolic batch axis.

    Only the batch is symbolic (H and W are fixed): shape reasoning over symbolic image sizes costs minutes
    on DenseNet's concatenations and buys nothing, since a graph is exported for one input size. Traced at
    batch 2 (batch 1 would be specialised). Layers overwritten in place by the next op are found on a first
    trace and copied in the second, as the eager runner does. With ``channels_last`` the graph is traced for
    (and expects) a channels-last input, so that its layers run in that memory order.
    """
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    copied: frozenset[str] = frozenset()
    with EvalGuard.of(model)():
        for _ in range(2):
            mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
            batch_only = [DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.STATIC]
            example = torch.zeros(2, 3, *size, dtype=dtype, device=device)
            if channels_last:
                example = example.contiguous(memory_format=torch.channels_last)
            images = mode.from_tensor(
                example,
                symbolic_context=StatelessSymbolicContext(dynamic_sizes=batch_only),
            )
            targets = mode.from_tensor(
                torch.full((2,), -1, dtype=torch.long, device=device),
                symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]),
            )
            try:
                return make_fx(
                    joint_function(model, layers, copied, cams),
                    decomposition_table=decompositions(),
                    tracing_mode="symbolic",
                    _allow_non_fake_inputs=True,
                )(images, targets)
            except _Overwritten as found:
                copied = copied | found.names
            except UnsupportedOpError as error:
                kinds = OP_MODULES.get(error.op, ())
                raise error.located([n for n, m in model.named_modules() if isinstance(m, kinds)]) from None
    raise RuntimeError("layer outputs were overwritten in place although they were copied")
