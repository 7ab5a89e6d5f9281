"""The public entry point: an Engine explains batches of images with Winsor-CAM or its baselines."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from wcam.engine.explanation import METHODS, Explanation
from wcam.engine.layers import as_index, conv_layers, preset_layers, resolve_layers
from wcam.engine.models import load_model
from wcam.engine.preprocess import ImageError, Preprocess
from wcam.engine.compiled_runner import CompiledRunner
from wcam.engine.onnx_runner import OnnxRunner
from wcam.engine.runner import BackboneResult, EagerRunner
from wcam.export.cache import cached_features_graph
from wcam.kernels import check_percentile
from wcam.kernels.dispatch import TorchKernels, select_kernels
from wcam.kernels.resample import INTERPOLATIONS

logger = logging.getLogger(__name__)


class Runner(Protocol):
    """Runs the network: one forward and the per-layer CAM sums and scores for the given layers."""

    def run(
        self, images: torch.Tensor, layers: Sequence[str], targets: object, kernels: TorchKernels
    ) -> BackboneResult: ...


BACKENDS = ("eager", "compiled", "onnxruntime")


class Engine:
    """Explains a CNN's decisions: one forward and one backward per batch, then batched CAM maths.

    ``layers`` defaults to every Conv2d (with the authors' presets for InceptionV3 and EfficientNet-B0).
    One Engine may serve many threads at once, and several engines may share one model: what outlives a
    call (the compiled graphs, the folded network, the layout found to work) is shared under locks. The model
    is used in eval mode while any call on it is inside and its flags are restored after the last; its
    parameters are not touched.
    ``device`` moves the model there (``model.to(device)``); by default the model's own device is used.

    ``backend`` runs the network: ``"eager"`` torch; ``"compiled"``, the joint forward + activation-gradient
    graph compiled by ``torch.compile`` (once per layer set, input size and dtype, on first use);
    ``"onnxruntime"``, that graph exported to ONNX (cached in ``cache_dir``, so a second start does not
    export again) and run by ONNX Runtime. The graph backends snapshot the model's weights.

    ``kernels`` runs the CAM maths: ``"triton"`` (fused Triton kernels), ``"torch"`` (vectorised torch) or
    ``"auto"`` (Triton on CUDA, torch elsewhere); None reads ``$WCAM_KERNELS`` (default ``auto``).

    ``channels_last`` (eager and compiled backends): hand the network its input in channels-last memory
    order, which is faster on a CPU (see :class:`~wcam.engine.runner.EagerRunner`); None (default) means yes
    on a CPU, no elsewhere. The model is not changed either way.

    ``fold_batch_norms`` (eager backend, torch kernels; off by default): run a traced copy of the model with
    each eval-mode batch norm folded into the convolution before it, and recover each explained
    convolution's own map and score from the folded output (exact algebra, :mod:`wcam.engine.batchnorm_folding`).
    Faster on a CPU, where each batch norm is a pass over memory forward and backward; the price is
    precision: the folded output ``s A + t`` holds ``A`` to float32 rounding of ``t``, which put the
    pretrained EfficientNet-Lite0's float32 heatmaps 1.7e-4 from float64 on real photos, against 1e-5
    unfolded. The copy shares all other modules, is checked once against the model (logits and input
    gradients) and is re-folded whenever the model's weights or modules change (writes through ``.data``
    bypass torch's version counters and are not seen: build a new engine after those); a model that cannot be
    traced runs as it is (logged), and one whose trace differs runs as it is until it changes.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        interpolation: str = "bilinear",
        preprocess: Preprocess | None = None,
        categories: list[str] | None = None,
        backend: str = "eager",
        cache_dir: str | Path | None = None,
        kernels: str | None = None,
        channels_last: bool | None = None,
        fold_batch_norms: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if fold_batch_norms and backend != "eager":
            raise ValueError(f"fold_batch_norms applies to the eager backend, not {backend!r}")
        if device is not None:
            model.to(device)
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        self.dtype = first.dtype if first is not None and first.dtype.is_floating_point else torch.float32
        self.kernels = select_kernels(kernels, self.device)
        self.model = model
        self.layers = resolve_layers(model, layers) if layers is not None else preset_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer to explain; pass layers=[...]")
        convs = conv_layers(model)
        self.gradcam_layer = convs[-1] if convs else self.layers[-1]
        self.interpolation = interpolation
        self.preprocess = preprocess or Preprocess()
        self.categories = categories
        self.backend = backend
        layout = self.device.type == "cpu" if channels_last is None else channels_last
        if backend == "eager":
            self._runner: Runner = EagerRunner(model, channels_last=layout, fold_batch_norms=fold_batch_norms)
        elif backend == "compiled":
            self._runner = CompiledRunner(model, channels_last=layout)
        else:
            self._runner = OnnxRunner(cached_features_graph(self, cache_dir))

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        providers: Sequence[str] | None = None,
        interpolation: str | None = None,
        kernels: str | None = None,
    ) -> "Engine":
        """An engine on an exported ``features`` graph alone (no torch model): layers, input size,
        normalisation, interpolation (unless given) and class names come from the file's metadata."""
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        runner = OnnxRunner(path, providers)
        info = runner.info
        engine = cls.__new__(cls)
        engine.model = None
        engine.device = torch.device(device)
        engine.kernels = select_kernels(kernels, engine.device)
        engine.dtype = runner.dtype
        engine.layers = list(info.layers)
        engine.gradcam_layer = info.gradcam_layer
        engine.interpolation = interpolation or info.interpolation
        engine.preprocess = Preprocess(size=tuple(info.input_size), mean=tuple(info.mean), std=tuple(info.std))
        engine.categories = info.categories
        engine.backend = "onnxruntime"
        engine._runner = runner
        return engine

    @classmethod
    def from_name(cls, name: str, weights: str | None = "DEFAULT", **kwargs: Any) -> "Engine":
        """An engine on a named model (resnet50, densenet121, vgg16, inception_v3, efficientnet_b0,
        convnext_tiny, mobilenet_v3_large, resnet18, efficientnet_lite0); see :func:`wcam.engine.models.load_model`
        for ``weights``. The model is built here and owned by the engine (eval mode, frozen parameters)."""
        built = load_model(name, weights)
        kwargs.setdefault("preprocess", built.preprocess)
        kwargs.setdefault("categories", built.categories)
        return cls(built.model, **kwargs)

    @property
    def channels_last(self) -> bool:
        """Whether the network gets its input in channels-last memory order (eager and compiled; see the class)."""
        return bool(getattr(self._runner, "channels_last", False))

    def layers_for(self, method: str = "winsor", layers: Sequence[str] | None = None) -> list[str]:
        """The layers a call with this ``method`` and ``layers`` explains (validated, in order)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if layers is None:
            return [self.gradcam_layer] if method == "gradcam" else list(self.layers)
        if isinstance(layers, str):
            layers = [layers]
        if method == "gradcam" and len(layers) != 1:
            raise ValueError(f"gradcam explains exactly one layer, got {len(layers)}")
        if self.model is None:  # an ONNX graph: the layers it exposes
            return resolve_layers(dict.fromkeys([*self.layers, self.gradcam_layer]), layers)
        return resolve_layers(self.model, layers)

    def explain(
        self,
        images: Any,
        targets: Any = None,
        p: float = 90.0,
        method: str = "winsor",
        layers: Sequence[str] | None = None,
    ) -> Explanation:
        """Explain a batch of images.

        ``images``: a normalised float tensor ``B x 3 x H x W``, or PIL images / uint8 arrays that the
        engine's ``preprocess`` resizes and normalises (by default to 224 x 224 with the ImageNet mean and
        std, whatever the model; :meth:`from_name` sets the named model's own). ``targets``: one class per
        image (an int for all), default the argmax of the same forward pass. ``method``: ``"winsor"`` at percentile ``p``, ``"gradcam"`` (one
        layer, default the model's last Conv2d) or ``"layer_mean"`` (unweighted mean of all layer maps).
        ``layers`` overrides the engine's layer set for this call.
        """
        p = check_percentile(p)
        names = self.layers_for(method, layers)
        batch, sizes = self.preprocess(images, self.device, self.dtype)
        result = self._runner.run(batch, names, targets, self.kernels)
        maps = result.maps
        broken = ~torch.isfinite(maps.scores)
        if bool(broken.any()):
            image, layer = (int(i) for i in broken.nonzero()[0])
            raise FloatingPointError(f"NaN or Inf gradients at layer {names[layer]!r} for image {image}")
        return Explanation.build(
            maps,
            method=method,
            p=p,
            selected=range(len(names)),
            out_size=tuple(batch.shape[-2:]),
            interpolation=self.interpolation,
            logits=result.logits,
            targets=result.targets,
            layer_names=names,
            image_sizes=sizes,
            kernels=self.kernels,
        )

    def explain_stream(
        self,
        frames: Iterable[Any],
        batch_size: int = 8,
        p: float = 90.0,
        method: str = "winsor",
        layers: Sequence[str] | None = None,
        targets: Any = None,
    ) -> Iterator[Explanation]:
        """Explain a stream of frames (uint8 ``H x W x 3`` arrays, uint8 ``3 x H x W`` tensors, PIL images, or
        normalised float ``3 x H x W`` / ``1 x 3 x H x W`` tensors of one size), yielding one single-image
        :class:`Explanation` per frame, in order.

        Frames are explained ``batch_size`` at a time (equal-sized uint8 frames are stacked and resized as
        one batch on the engine's device), so at most ``batch_size`` frames are held, and each yielded
        explanation owns its tensors (keeping one does not keep its batch); an endless iterable gives an
        endless stream. ``targets``: one class for every frame, or None for each frame's argmax. The
        arguments are checked here, before the first frame is read.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if targets is not None:
            index = as_index(targets)
            if index is None:
                raise TypeError(f"targets for a stream must be one int class (or None), got {type(targets).__name__}")
            targets = index
        p = check_percentile(p)
        names = self.layers_for(method, layers)
        return self._stream(iter(frames), batch_size, targets, p, method, names)

    def _stream(
        self, frames: Iterator[Any], batch_size: int, targets: Any, p: float, method: str, layers: list[str]
    ) -> Iterator[Explanation]:
        done = 0
        while pending := list(itertools.islice(frames, batch_size)):
            batch = _stack_frames(pending, done)
            explanation = self.explain(batch, targets=targets, p=p, method=method, layers=layers)
            for i in range(len(explanation)):
                yield explanation.image(i, copy=True)
            done += len(pending)


def _stack_frames(frames: list[Any], first_index: int) -> Any:
    """Equal-sized uint8 ``H x W x 3`` numpy frames as one ``B x 3 x H x W`` tensor (resized in one call),
    normalised float frames as one float batch; anything else as the list it is. ``first_index``: the stream
    position of ``frames[0]``, for errors."""
    floats = [isinstance(f, torch.Tensor) and f.dtype.is_floating_point for f in frames]
    if any(floats):
        if not all(floats):
            odd = floats.index(not floats[0])
            raise ImageError(
                f"frame {first_index + odd} is {'a float tensor' if floats[odd] else type(frames[odd]).__name__}"
                f" where frame {first_index} is {'a float tensor' if floats[0] else type(frames[0]).__name__}: a"
                " stream's frames are either all normalised float tensors or all uint8 arrays, tensors or PIL images"
            )
        shaped = [f.unsqueeze(0) if f.dim() == 3 else f for f in frames]
        for k, frame in enumerate(shaped):
            if frame.dim() != 4 or frame.shape[0] != 1 or frame.shape != shaped[0].shape:
                raise ImageError(
                    f"frame {first_index + k}: a normalised float frame must be 3 x H x W (or 1 x 3 x H x W), all of"
                    f" one size; got {tuple(frames[k].shape)} where frame {first_index} is {tuple(frames[0].shape)}"
                )
        return torch.cat(shaped)
    first = frames[0]
    if (
        isinstance(first, np.ndarray)
        and first.dtype == np.uint8
        and first.ndim == 3
        and first.shape[2] == 3
        and all(isinstance(f, np.ndarray) and f.shape == first.shape and f.dtype == np.uint8 for f in frames)
    ):
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return frames
