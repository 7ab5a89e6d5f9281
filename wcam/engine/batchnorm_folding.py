"""Eval-mode batch norms folded into the convolutions that feed them, for the eager backend.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``W' = s W`` and ``b' = s (b - mu) + beta``, where
``s = gamma / sqrt(var + eps)`` (:func:`torch.nn.utils.fusion.fuse_conv_bn_weights`); the folded network
skips each folded batch norm in the forward and in the backward. The explained layer stays the
convolution's own output ``A``: the folded one is ``F = s A + t`` with ``t = beta - s mu``, so
``dy/dA = s dy/dF`` and, per image, with ``alpha_F[k] = mean_uv dy/dF[k]``,

    sum_k alpha_A[k] A[k] = sum_k alpha_F[k] F[k] - sum_k alpha_F[k] t[k],   score = mean_k s[k] alpha_F[k]

(no division by ``s``: exact also where ``gamma = 0``). :class:`~wcam.engine.runner.layer_cams` applies
this per layer from the ``(s, t)`` pairs in :attr:`FoldedNetwork.affines`.

The precision of ``A`` is that of ``F``: float32 rounding at the scale of ``t``, where the model's own
``A`` is rounded at its own scale. So folding is an option (``Engine(fold_batch_norms=True)``), not the
default: on the pretrained EfficientNet-Lite0 and real photos it moved float32 heatmaps 1.7e-4 from float64
(1e-5 unfolded), and it ran 1.3-1.6x faster on the 2-core CPU (``bench/RESULTS.md``).

The folded network is a ``torch.fx`` trace of the model that shares every module but the folded
convolutions (new copies) and out-of-place copies of in-place ops that would overwrite a folded output.
The caller's model is never changed. The trace is checked once against the model (logits and the input
gradient of one image: fx does not record ``torch.no_grad()`` blocks nor the data-dependent branches it
took), and before every call against the model's current state (same modules and parameters in the same
places, no new hooks on a traced-through module; weights, biases and running statistics not changed since
folding, as their storage and version counter tell: a write through ``.data`` escapes the counter);
otherwise it is folded again.
"""

from __future__ import annotations

import copy
import functools
import logging
import operator
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from wcam.engine.capture import own_hooks_only

logger = logging.getLogger(__name__)

Affine = tuple[Tensor, Tensor]  # (s, t): the folded output is s * A + t, channel by channel

_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


def _has_hooks(module: nn.Module) -> bool:
    """Hooks of the model's own: wcam's per-call capture hooks (other threads' calls) do not count."""
    return bool(not own_hooks_only(module._forward_hooks) or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _resolve(root: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), root)


class _Tracer(fx.Tracer):
    """Traces into a module only where a batch norm could be folded: a module without a batch norm inside, a
    convolution, a batch norm, an explained layer or a module with hooks of its own stays one call.

    While it traces, ``torch.fx`` patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process;
    a module call or attribute read from any other thread (another request on this model, or any model)
    goes through this tracer then, and is passed straight to the module, never recorded.
    """

    def __init__(self, model: nn.Module, keep: set[nn.Module]) -> None:
        super().__init__()
        plain = {m for m in model.modules() if not any(isinstance(c, nn.BatchNorm2d) for c in m.modules())}
        self._units = keep | plain
        self._thread = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            m in self._units
            or isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
            or _has_hooks(m)
            or super().is_leaf_module(m, qualname)
        )


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
        and conv.weight.dtype in (torch.float32, torch.float64)
        and not _has_hooks(conv)  # a hook there expects the convolution's own output
        and not _has_hooks(bn)
    )


@dataclass(frozen=True, eq=False)
class FoldedNetwork:
    """A traced copy of a model with its batch norms folded; valid while :meth:`matches` the model."""

    module: fx.GraphModule
    affines: dict[str, Affine]  # by convolution name, for each folded convolution
    leaves: frozenset[str]  # modules the trace calls as units: the only ones a hook can be put on
    _places: tuple[tuple[str, Any], ...]  # (name, object) of every module and attribute the graph uses
    _sources: tuple[Tensor, ...]  # the tensors folded into the network, and their state when folded
    _state: tuple[tuple[int, int], ...]
    _watched: tuple[nn.Module, ...]  # traced through or folded away: a hook put on one later would be missed

    @property
    def folded(self) -> int:
        return len(self.affines)

    def matches(self, model: nn.Module) -> bool:
        """Whether the model still has what the network was folded from (a few microseconds per module)."""
        try:
            if any(_resolve(model, name) is not obj for name, obj in self._places):
                return False
        except AttributeError:
            return False
        if any(_has_hooks(m) for m in self._watched):
            return False
        return all((t.data_ptr(), t._version) == state for t, state in zip(self._sources, self._state))

    def layer_affines(self, layers: Sequence[str]) -> list[Affine | None] | None:
        """Per explained layer, its folding (or None); None when a layer is not a unit of the trace."""
        if any(name not in self.leaves for name in layers):
            return None
        return [self.affines.get(name) for name in layers]


# torch.fx patches nn.Module and torch functions for the whole process while it traces, and undoes it by one
# global patcher: two traces that overlap in time undo each other's patches, so wcam traces one at a time
_TRACING = threading.Lock()


class GradModeSwitch(RuntimeError):
    """The model switches grad mode inside its forward (``torch.no_grad()``, ``enable_grad``), which a trace
    does not keep: its gradients would differ from the model's."""


@contextmanager
def _grad_mode_watch(thread: int) -> Iterator[list[bool]]:
    """Record (in the list yielded) every grad-mode switch made by ``thread`` meanwhile; other threads' switches
    pass through untouched. Held under :data:`_TRACING`, so the patches never overlap."""
    switches: list[bool] = []
    original = torch._C._set_grad_enabled

    def watched(mode: bool) -> None:
        if threading.get_ident() == thread:
            switches.append(mode)
        original(mode)

    torch._C._set_grad_enabled = watched
    try:
        yield switches
    finally:
        torch._C._set_grad_enabled = original


def fold_batch_norms(model: nn.Module, keep: Sequence[str] = ()) -> FoldedNetwork:
    """Trace ``model`` (in its current mode: eval, for folding to be right) keeping the modules named in
    ``keep`` as units, and fold every batch norm whose input is a convolution's output used by nothing else.
    Raises :class:`GradModeSwitch` for a model that switches grad mode in its forward, and whatever
    ``torch.fx`` raises on a model it cannot trace. The model is left as it was (fx stores the tensors that a
    forward creates as attributes of the root it traces: they move to the trace)."""
    if _has_hooks(model):
        raise ValueError("the model has hooks of its own on its root module")
    modules = dict(model.named_modules())
    keep_modules = {modules[name] for name in keep}
    tracer = _Tracer(model, keep_modules)
    attributes = set(model.__dict__)
    with _TRACING, _grad_mode_watch(threading.get_ident()) as switches:
        try:
            graph = tracer.trace(model)
            network = fx.GraphModule(tracer.root, graph)
        finally:
            created = set(model.__dict__) - attributes
            for name in created:  # fx's _tensor_constant<N>: now the trace's own
                delattr(model, name)
    if switches:
        raise GradModeSwitch("the model switches grad mode (torch.no_grad() or enable_grad()) inside its forward")
    places = [(n.target, _resolve(model, n.target)) for n in graph.nodes
              if n.op in ("call_module", "get_attr") and n.target.split(".")[0] not in created]
    affines: dict[str, Affine] = {}
    sources: list[Tensor] = []
    replaced: list[nn.Module] = []
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv, bn = modules.get(source.target), modules.get(node.target)  # not the copies made below
        if not _foldable(conv, bn):
            continue
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            scale = (bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)) * torch.rsqrt(
                bn.running_var + bn.eps
            )
            shift = bias - (conv.bias * scale if conv.bias is not None else 0)
        weight, bias = (nn.Parameter(v.detach(), requires_grad=False) for v in (weight, bias))
        memo = {id(conv.weight): weight} | ({id(conv.bias): bias} if conv.bias is not None else {})
        folded = copy.deepcopy(conv, memo)  # the same class and settings, the folded parameters
        folded.bias = bias
        _replace(network, source.target, folded)
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        _out_of_place_users(network, source)
        affines[source.target] = (scale.detach(), shift.detach())
        replaced += [conv, bn]
        sources += [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
                    if t is not None]
    graph.lint()
    network.recompile()
    leaves = frozenset(n.target for n in graph.nodes if n.op == "call_module")
    traced = tuple(m for name, m in modules.items() if name not in leaves and m is not model
                   and not any(name.startswith(leaf + ".") for leaf in leaves))
    return FoldedNetwork(
        module=network, affines=affines, leaves=leaves, _places=tuple(places), _sources=tuple(sources),
        _state=tuple((t.data_ptr(), t._version) for t in sources), _watched=(*traced, model, *replaced),
    )


def _replace(network: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at ``target`` in the network's own module tree (its parents there are the network's)."""
    parent, _, name = target.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, name, module)


def _out_of_place_users(network: fx.GraphModule, node: fx.Node) -> None:
    """Make the ops that would overwrite a folded output in place (``ReLU(inplace=True)``, ``out += x``)
    write a new tensor instead: the output was a batch norm's input, which nothing overwrote."""
    for user in list(node.users):
        if user.args[:1] != (node,):
            continue
        if user.op == "call_module" and getattr(network.get_submodule(user.target), "inplace", False):
            module = copy.copy(network.get_submodule(user.target))
            module.inplace = False
            name = f"{user.target.replace('.', '_')}_out_of_place"
            network.add_submodule(name, module)
            user.target = name
        elif user.op == "call_function" and user.target in _OUT_OF_PLACE:
            user.target = _OUT_OF_PLACE[user.target]
        elif user.op == "call_method" and user.target.endswith("_") and not user.target.startswith("_"):
            user.target = user.target[:-1]


class BatchNormFolding:
    """The folded network of one model for a runner: folded on first use, checked against the model's logits
    once, and folded again whenever it no longer :meth:`~FoldedNetwork.matches` the model. A model that
    cannot be traced runs unfolded for good; one whose trace has nothing to fold, or fails the check, runs
    unfolded until it changes, and is then traced and checked again (each logged)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._network: FoldedNetwork | None = None
        self._rejected: FoldedNetwork | None = None  # the latest trace that was not used, while it matches
        self._failed = False

    @property
    def current(self) -> FoldedNetwork | None:
        """The folded network of the latest call (None before the first, or when the model is not folded)."""
        return None if self._failed else self._network

    def network(
        self, model: nn.Module, layers: Sequence[str], example: Tensor
    ) -> tuple[nn.Module, list[Affine | None]] | None:
        """The folded network and the per-layer foldings for a call explaining ``layers``, or None to run
        the model itself. ``example``: an input (one image is enough) to check a new folding on."""
        network = self._network
        if network is None or not network.matches(model):
            if self._unfoldable(model):  # without the lock: a model that runs unfolded never waits here
                return None
            with self._lock:
                network = self._network
                if network is None or not network.matches(model):
                    if self._unfoldable(model):
                        return None
                    self._network = network = self._fold(model, layers, example)
                    if network is None:
                        return None
        affines = network.layer_affines(layers)
        return None if affines is None else (network.module, affines)

    def _unfoldable(self, model: nn.Module) -> bool:
        rejected = self._rejected
        return self._failed or (rejected is not None and rejected.matches(model))

    def _fold(self, model: nn.Module, layers: Sequence[str], example: Tensor) -> FoldedNetwork | None:
        try:
            network = fold_batch_norms(model, layers)
        except Exception as failure:  # noqa: BLE001 - any tracing failure means: run the model as it is
            self._failed = True
            logger.info("batch norms not folded: the model cannot be traced (%s)", failure)
            return None
        if not network.folded:
            return self._reject(network, "the model has no convolution that feeds a batch norm alone")
        expected = _response(model, example)  # an error here is the model's own (or the input's): raised
        if not bool(torch.isfinite(expected[0]).all()):  # the call fails on these logits anyway: try again next time
            logger.info("batch norms not folded for this call: the model's own logits are not finite")
            return None
        try:
            got = _response(network.module, example)
        except Exception as failure:  # noqa: BLE001 - e.g. a model that returns no tensor
            return self._reject(network, f"the traced model fails ({failure})")
        problem = _difference(expected, got)
        if problem:  # e.g. fx does not record torch.no_grad() blocks, nor data-dependent branches it took
            return self._reject(network, f"the traced model's {problem}", logging.WARNING)
        self._rejected = None
        logger.info("folded %d batch norms into their convolutions", network.folded)
        return network

    def _reject(self, network: FoldedNetwork, why: str, level: int = logging.INFO) -> None:
        logger.log(level, "batch norms not folded: %s (until the model changes)", why)
        self._rejected = replace(network, module=None, affines={})  # what matches() reads; not the folded copies
        return None


def _response(module: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """Logits, and the gradient of each image's top logit w.r.t. the input (None where none flows)."""
    images = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = module(images)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise TypeError(f"expected B x K logits, got {type(logits).__name__}")
    if not logits.requires_grad:
        return logits.detach(), None
    (gradient,) = torch.autograd.grad(logits.amax(dim=1).sum(), images, allow_unused=True)
    return logits.detach(), gradient


def _difference(expected: tuple[Tensor, Tensor | None], got: tuple[Tensor, Tensor | None]) -> str:
    """What differs between two :func:`_response` results beyond float rounding, or ''."""
    (logits, gradient), (logits_got, gradient_got) = expected, got
    error = float((logits_got - logits).abs().max())
    if not error <= 1e-4 * (1.0 + float(logits.abs().max())):
        return f"logits differ by {error:.3g}"
    if (gradient is None) != (gradient_got is None):
        return "gradients flow where the model's do not (or the other way round)"
    if gradient is not None:  # a norm, not a max: a ReLU input within rounding of 0 may flip one element
        # float32 folding moves it by up to 8.4e-3 of its norm (resnet50, Lite0, resnet18 on the packaged photos
        # and noise: the ReLU branches that flip); a structural fault (a lost no_grad, a path cut) by O(1)
        error = float((gradient_got - gradient).norm())
        if not error <= 5e-2 * float(gradient.norm()) + 1e-12:
            return f"input gradients differ by {error:.3g} (norm, against {float(gradient.norm()):.3g})"
    return ""
