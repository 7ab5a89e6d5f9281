"""Backbone runners: one forward and the gradients of the target logits w.r.t. the hooked layer outputs."""

from __future__ import annotations

import logging
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor, nn

from wcam.engine.batchnorm_folding import Affine, BatchNormFolding
from wcam.engine.capture import LayerCapture
from wcam.engine.gradient_roots import gradient_roots
from wcam.kernels import LayerMaps, channel_weights, group_maps, weighted_channels
from wcam.kernels.dispatch import TorchKernels
from wcam.kernels.transfer import to_device

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BackboneResult:
    """What the rest of the CAM maths needs from the network: logits, targets and the layer maps and scores."""

    logits: Tensor  # B x K
    targets: Tensor  # B, int64
    maps: LayerMaps


class TargetError(ValueError):
    """Targets that do not fit the batch or the model's classes."""


def check_targets(targets: object, batch: int, classes: int) -> Tensor | None:
    """Per-image target classes (int64, CPU) validated against ``batch`` and ``classes``; None stays None
    (the argmax of the same forward pass)."""
    if targets is None:
        return None
    try:
        values = torch.as_tensor(targets, device="cpu")
    except (TypeError, ValueError, RuntimeError) as error:  # a str, a None in a list, ragged lists
        raise TargetError(f"targets must be an int or one int per image, got {targets!r:.80}") from error
    if values.dim() > 1:
        raise TargetError(f"targets must be an int or one int per image, got shape {tuple(values.shape)}")
    if values.numel() != batch and values.dim() == 1:
        raise TargetError(f"got {values.numel()} targets for a batch of {batch} images")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TargetError(f"targets must be integers (class indices), got {values.dtype}")
    values = values.long().expand(batch) if values.dim() == 0 else values.long()
    bad = (values < 0) | (values >= classes)
    if bool(bad.any()):
        raise TargetError(
            f"target {int(values[bad][0])} out of range: the model has {classes} classes (0..{classes - 1})"
        )
    return values


def graph_targets(targets: object, batch: int, classes: int) -> Tensor:
    """Targets as a graph input: validated like :func:`check_targets`, with -1 meaning the argmax."""
    chosen = check_targets(targets, batch, classes)
    return torch.full((batch,), -1, dtype=torch.long) if chosen is None else chosen


def check_logits(logits: Tensor) -> None:
    """Refuse NaN or Inf logits: nothing explained from them would mean anything."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("the model produced NaN or Inf logits for these images")


class EvalGuard:
    """Holds a shared model in eval mode while any call is inside; restores every module's flag after the last.

    Reference-counted under a lock so that concurrent calls on one model never flip it back mid-forward; one
    guard per model (:meth:`of`), so that two engines on one model (a Winsor-CAM and a Grad-CAM one, or eager
    and compiled) count each other's calls too. A model already in eval mode throughout (a server's) is only
    looked at: one pass over its modules, where ``eval()`` and the restore would cost 0.5 ms per call on
    EfficientNet-Lite0's 185 modules; so a model whose ``train()`` override does more than set the flags gets
    no ``eval()`` call when they are all False.
    """

    _guards: "dict[int, EvalGuard]" = {}  # by id(model): models that compare equal are still two models
    _guards_lock = threading.RLock()  # re-entrant: a model collected inside of() forgets its guard in that thread

    @classmethod
    def of(cls, model: nn.Module) -> "EvalGuard":
        """The guard of ``model``: the same object for every caller while the model lives."""
        with cls._guards_lock:
            guard = cls._guards.get(id(model))
            if guard is None or guard._model() is not model:
                guard = cls._guards[id(model)] = cls(model)
            return guard

    @classmethod
    def _forget(cls, key: int, ref: "weakref.ref[nn.Module]") -> None:
        with cls._guards_lock:
            guard = cls._guards.get(key)
            if guard is not None and guard._model is ref:
                del cls._guards[key]

    def __init__(self, model: nn.Module) -> None:
        key = id(model)
        # a weak reference (the registry must not keep the model alive) that drops the entry with the model
        self._model = weakref.ref(model, lambda ref: EvalGuard._forget(key, ref))
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: list[tuple[nn.Module, bool]] = []  # empty while no module was in training mode

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                model = self._model()
                if model is None:  # a caller holds its model while inside: cannot happen through Engine
                    raise RuntimeError("the model of this eval-mode guard no longer exists")
                saved = [(m, m.training) for m in model.modules()]
                if any(flag for _, flag in saved):
                    self._saved = saved
                    model.eval()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for module, flag in self._saved:
                        module.training = flag
                    self._saved = []


class LayoutChoice:
    """Channels-last network input until the model fails on it once, then the input's own layout for good.

    ``run(step)`` calls ``step(channels_last)``; while channels-last has not yet worked once, a RuntimeError
    there (a model that needs contiguous tensors, e.g. ``x.view(B, -1)`` on a 4-D map) runs ``step(False)``
    instead, which raises if the model fails either way, and keeps to that layout afterwards.
    """

    def __init__(self, channels_last: bool) -> None:
        self.channels_last = channels_last
        self._confirmed = False

    def run(self, step: Callable[[bool], T]) -> T:
        if not self.channels_last:
            return step(False)
        try:
            result = step(True)
        except RuntimeError as error:
            if self._confirmed:
                raise
            result = step(False)
            self.channels_last = False
            logger.info("the model fails on channels-last input (%s); using the input's own layout", error)
            return result
        self._confirmed = True
        return result


class EagerRunner:
    """Runs a torch model eagerly: one forward with hooks, one ``autograd.grad`` to the earliest hooked outputs.

    With the torch kernels, each layer's channel weights (the spatial mean of its gradient) are taken in a
    hook on the layer's output that fires the moment its gradient is complete, and the backward is asked only
    for the :func:`~wcam.engine.gradient_roots.gradient_roots` (the stem, in a CNN), so no gradient outlives
    the op that consumes it; the weighted channel sums run after the backward. Measured on the 2-core CPU at
    batch 8 (``bench/cam_placement.py``): as fast as doing all the maths in the hooks or all after the
    backward (within this machine's noise), with a peak resident memory 19% lower on resnet50. With the
    Triton kernels, all layers go to one fused launch after the backward instead. No parameter gradient is
    computed or accumulated (``autograd.grad`` only walks to the requested tensors). The input does not
    require grad: with frozen parameters, everything before the first hooked layer runs without recording a
    graph, and that layer's output becomes the leaf the gradients flow to (see :class:`LayerCapture`), so
    Grad-CAM on a late layer costs little more than a plain forward (``bench/RESULTS.md``). Works inside
    ``torch.no_grad()``; refuses ``torch.inference_mode()``, where no graph exists. A layer whose output the next op overwrites in place
    is detected on the first call that sees it, which then runs again copying that layer's output; later
    calls copy it from the start.

    With ``channels_last`` the network gets its input in channels-last memory order (oneDNN's native layout
    on a CPU: the forward + backward ran 1.12x (resnet50) to 1.36x (EfficientNet-Lite0) faster at batch 8 on
    the 2-core CPU, ``bench/RESULTS.md``); the model itself is not touched. A model whose code needs
    contiguous tensors (``x.view(B, -1)`` on a 4-D map) fails on its first channels-last call, which then
    runs again with the input as given; later calls use that from the start.
    """

    def __init__(self, model: nn.Module, channels_last: bool = False, fold_batch_norms: bool = False) -> None:
        self.model = model
        self.folding = BatchNormFolding() if fold_batch_norms else None
        self._eval = EvalGuard.of(model)
        self._lock = threading.Lock()
        self._copied: frozenset[str] = frozenset()
        self.layout = LayoutChoice(channels_last)

    @property
    def channels_last(self) -> bool:
        return self.layout.channels_last

    def run(self, images: Tensor, layers: Sequence[str], targets: object, kernels: TorchKernels) -> BackboneResult:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "wcam needs gradients, which torch.inference_mode() forbids; call it outside inference_mode "
                "(torch.no_grad() is fine)"
            )
        if images.is_inference():
            images = images.clone()
        images = images.detach()
        return self.layout.run(
            lambda last: self._run(
                images.contiguous(memory_format=torch.channels_last) if last else images, layers, targets, kernels
            )
        )

    def _run(self, images: Tensor, layers: Sequence[str], targets: object, kernels: TorchKernels) -> BackboneResult:
        result = self._attempt(images, layers, targets, kernels)
        if result is None:  # an in-place op overwrote a layer output: now known, so copy it this time
            result = self._attempt(images, layers, targets, kernels)
        if result is None:
            raise RuntimeError("layer outputs were overwritten in place although they were copied")
        return result

    def _attempt(
        self, images: Tensor, layers: Sequence[str], targets: object, kernels: TorchKernels
    ) -> BackboneResult | None:
        with self._eval():
            network, affines = self._network(images, layers, kernels)
            with LayerCapture(network, list(layers), self._copied) as capture, torch.enable_grad():
                logits = network(images)
                result = self._backward(logits, images, capture, targets, kernels, affines)
        return result

    def _network(
        self, images: Tensor, layers: Sequence[str], kernels: TorchKernels
    ) -> tuple[nn.Module, list[Affine | None] | None]:
        """The network to run: the batch-norm-folded one where it applies (torch kernels), else the model."""
        if self.folding is None or kernels.name != "torch":
            return self.model, None
        folded = self.folding.network(self.model, layers, images[:1])
        return (self.model, None) if folded is None else folded

    def _backward(
        self,
        logits: object,
        images: Tensor,
        capture: LayerCapture,
        targets: object,
        kernels: TorchKernels,
        affines: list[Affine | None] | None,
    ) -> BackboneResult | None:
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
            raise TypeError(
                f"the model must return B x K logits, got {type(logits).__name__}"
                f"{tuple(logits.shape) if isinstance(logits, Tensor) else ''}"
            )
        check_logits(logits)
        chosen = check_targets(targets, *logits.shape)
        chosen = logits.detach().argmax(dim=1) if chosen is None else to_device(chosen, logits.device)
        activations = capture.collect()
        overwritten = capture.overwritten()
        if overwritten:
            with self._lock:
                self._copied = self._copied | overwritten
            logger.info("outputs of %s are overwritten in place by the next op; copying them", sorted(overwritten))
            return None
        objective = logits.gather(1, chosen.unsqueeze(1)).sum()
        if kernels.name == "torch":
            maps = _maps_during_backward(objective, activations, affines)
        else:
            gradients = torch.autograd.grad(objective, activations, allow_unused=True)
            gradients = [torch.zeros_like(a) if g is None else g for a, g in zip(activations, gradients)]
            maps = kernels.layer_maps([a.detach() for a in activations], gradients)
        return BackboneResult(logits=logits.detach(), targets=chosen, maps=maps)


def _maps_during_backward(
    objective: Tensor, activations: list[Tensor], affines: Sequence[Affine | None] | None = None
) -> LayerMaps:
    """:func:`layer_cams`, then each layer's map normalised (:func:`~wcam.kernels.group_maps`)."""
    return group_maps(*layer_cams(objective, activations, affines))


def layer_cams(
    objective: Tensor, activations: list[Tensor], affines: Sequence[Affine | None] | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's raw Grad-CAM sum and raw score (as :func:`~wcam.kernels.channel_cam`), from a backward
    from ``objective``, with each layer's channel weights taken by a hook the moment its gradient is complete
    (while it is still in cache), and the weighted channel sums after the backward. The backward is asked
    only for the :func:`gradient_roots`, so each gradient is freed once used (the compiled backend traces
    this same function into its graph). A layer without a gradient (the objective does not depend on
    it, or autograd has none for it, as for an unused piece of a ``chunk``) gets a zero map and score; an
    objective that depends on no layer at all is refused. Where ``affines[i]`` is ``(s, t)``, activation
    ``i`` is a batch-norm-folded output ``s A + t`` and the map and score are those of ``A``
    (:mod:`wcam.engine.batchnorm_folding`)."""
    reached, roots = gradient_roots(objective, activations)
    if not reached:
        raise RuntimeError(
            "the target logits depend on none of the explained layers in the autograd graph: does the model run "
            "them under torch.no_grad(), detach their outputs, or checkpoint them with use_reentrant=True?"
        )
    alphas: list[Tensor | None] = [None] * len(activations)
    fired: set[int] = set()

    def on_gradient(index: int) -> Callable[[Tensor | None], None]:
        def hook(gradient: Tensor | None) -> None:
            fired.add(index)
            if gradient is not None:
                alphas[index] = channel_weights(gradient)

        return hook

    handles = [activations[i].register_hook(on_gradient(i)) for i in reached]
    try:
        gradients = torch.autograd.grad(objective, [activations[i] for i in roots], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    fired.update(i for i, gradient in zip(roots, gradients) if gradient is None)  # no gradient, no hook call
    del gradients
    missed = sorted(reached - fired)
    if missed:  # cannot happen if gradient_roots is right; never let it pass as a zero map
        raise RuntimeError(f"the backward did not reach hooked layers {missed}")
    cams, scores = [], []
    for activation, alpha, affine in zip(activations, alphas, affines or [None] * len(activations)):
        if alpha is None:  # no gradient: a zero map and score, without reading the activation
            batch, _, h, w = activation.shape
            dtype = torch.promote_types(activation.dtype, torch.float32)
            cams.append(activation.new_zeros((batch, h, w), dtype=dtype))
            scores.append(activation.new_zeros((batch,), dtype=dtype))
        else:
            cam, score = layer_cam(activation, alpha, affine)
            cams.append(cam)
            scores.append(score)
    return cams, scores


def layer_cam(activation: Tensor, alpha: Tensor, affine: Affine | None = None) -> tuple[Tensor, Tensor]:
    """One layer's raw Grad-CAM sum and raw score from its channel weights ``alpha`` (``B x C``); with
    ``affine = (s, t)``, ``activation`` is a batch-norm-folded output ``s A + t`` and both are those of ``A``."""
    cam = weighted_channels(activation.detach(), alpha)
    if affine is None:
        return cam, alpha.mean(dim=1)
    scale, shift = (v.to(alpha.dtype) for v in affine)
    return cam - (alpha @ shift).view(-1, 1, 1), (alpha * scale).mean(dim=1)
