"""Hooks that capture the raw outputs of chosen layers during one forward pass, owned by one object."""

from __future__ import annotations

import threading
from types import TracebackType

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class CaptureHook:
    """The forward hook of one :class:`LayerCapture` on one layer: a class of its own, so that code which
    looks for the model's own hooks (:mod:`wcam.engine.batchnorm_folding`) can tell wcam's per-call hooks,
    which other threads put on a shared model at any moment, from them."""

    def __init__(self, capture: "LayerCapture", name: str) -> None:
        self._capture = capture
        self._name = name

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        return self._capture._record(self._name, output)


def own_hooks_only(hooks: dict) -> bool:
    """Whether a module's forward-hook dict holds nothing but wcam's :class:`CaptureHook` instances."""
    return all(isinstance(hook, CaptureHook) for hook in hooks.values())


class LayerCapture:
    """Context manager: records the raw output of each named layer during a forward pass in this thread.

    The stored tensor is the layer's raw output, and gradients w.r.t. it are gradients w.r.t. the raw
    output, unless the next op overwrites it in place (VGG's ``ReLU(inplace=True)``): :meth:`overwritten`
    reports such layers (by their version counters), and layers named in ``clone`` hand the rest of the
    network a copy instead, so the stored tensor stays raw. Copies cost memory traffic, so only layers known
    to need them are copied. Hooks fire only for the thread that opened the capture, so many threads can
    share one model; all hooks are removed on exit, whatever happened inside.
    """

    def __init__(self, model: nn.Module, names: list[str], clone: frozenset[str] = frozenset()) -> None:
        self._modules = [(name, model.get_submodule(name)) for name in names]
        self._clone = clone
        self._thread = threading.get_ident()
        self._handles: list[RemovableHandle] = []
        self.outputs: dict[str, Tensor] = {}
        self._versions: dict[str, int] = {}
        self._calls: dict[str, int] = {}

    def __enter__(self) -> "LayerCapture":
        try:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(CaptureHook(self, name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, name: str, output: Tensor) -> Tensor | None:
        if threading.get_ident() != self._thread:
            return None
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise TypeError(
                f"layer {name!r} must output a 4-D tensor (B x C x h x w), got "
                f"{type(output).__name__}{tuple(output.shape) if isinstance(output, Tensor) else ''}"
            )
        self._calls[name] = self._calls.get(name, 0) + 1
        copy = name in self._clone
        if not output.requires_grad:  # does not depend on the input: make it a leaf, keep it safe
            output.requires_grad_(True)
            copy = True
        self.outputs[name] = output
        self._versions[name] = output._version
        return output.clone() if copy else None

    def collect(self) -> list[Tensor]:
        """The captured outputs in layer order; every layer must have run exactly once."""
        missing = [name for name, _ in self._modules if name not in self.outputs]
        if missing:
            raise RuntimeError(f"layers did not run in the forward pass: {', '.join(missing)}")
        repeated = [name for name, count in self._calls.items() if count > 1]
        if repeated:
            raise RuntimeError(
                f"layers ran more than once in one forward pass (a shared module): {', '.join(repeated)}; "
                "Winsor-CAM needs one output per layer"
            )
        return [self.outputs[name] for name, _ in self._modules]

    def overwritten(self) -> frozenset[str]:
        """Layers whose captured output was modified in place after the hook ran."""
        return frozenset(name for name, out in self.outputs.items() if out._version != self._versions[name])
