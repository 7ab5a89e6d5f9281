"""Backbone runner on ``torch.compile``: the joint forward + activation-gradient graph (the one ONNX export
traces) with the per-layer CAM contraction inside it, compiled once per layer set, input size, dtype and
batch bucket."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from wcam.engine.runner import BackboneResult, LayoutChoice, check_logits, graph_targets
from wcam.export.joint import trace_joint
from wcam.kernels import group_maps
from wcam.kernels.dispatch import TorchKernels
from wcam.kernels.transfer import to_device

logger = logging.getLogger(__name__)

MAX_GRAPHS = 16  # compiled graphs kept per engine; the least recently used goes beyond that


class CompiledRunner:
    """Compiles lazily on the first call for each (layers, H x W, dtype, device, batch bucket) and reuses
    the result.

    Inductor generates C++ on CPU and Triton kernels on GPU. Each graph has a static batch size, a power of
    two (1, 2, 4, 8, ...), and a batch is padded up to its bucket with copies of its last image (whose
    results are dropped): so a stream of batches of one size compiles once, a ragged tail or ``--every``'s
    varying counts at most once per power of two, and a batch never costs more than twice its own size. On
    the 2-core CPU, static graphs compiled and ran faster than one dynamic-batch graph: densenet121's
    compiled in 161 s against more than 18 minutes, EfficientNet-Lite0's ran 15% faster (``bench/RESULTS.md``).
    Batch 1 (video, latency) is on CUDA replayed as a CUDA graph (Inductor's ``reduce-overhead`` mode: one
    launch instead of hundreds, where batch-1 latency is launch-bound); its calls are serialised and its
    outputs copied out before the next replay overwrites them. ``compile_seconds`` records what each
    compilation cost (tracing included; Inductor's own work runs on the first call, which is included). The
    graph is traced in eval mode and holds the parameters as they are: build a new engine after changing the
    model. At most :data:`MAX_GRAPHS` graphs are kept, the least recently used dropped first (logged): a server
    that lets requests choose layers or input sizes would otherwise keep every graph it ever compiled (and
    compiles again, for seconds to minutes, whatever it dropped). With ``channels_last`` (the CPU default)
    the graph is traced for, and given, channels-last input, as the eager runner does.
    """

    def __init__(self, model: nn.Module, channels_last: bool = False) -> None:
        self.model = model
        self.layout = LayoutChoice(channels_last)
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple, tuple[Callable[..., tuple[Tensor, ...]], int]] = OrderedDict()
        self.compile_seconds: dict[tuple, float] = {}

    @property
    def channels_last(self) -> bool:
        return self.layout.channels_last

    def _get(self, layers: Sequence[str], images: Tensor, bucket: int) -> tuple[Callable[..., tuple[Tensor, ...]], int, tuple, bool]:
        key = (tuple(layers), tuple(images.shape[-2:]), images.dtype, images.device, bucket)
        found = self._compiled.get(key)  # no lock: a graph in use never waits for another one being traced
        if found is not None:
            try:
                self._compiled.move_to_end(key)
            except KeyError:  # dropped by another thread meanwhile: this call still has it
                pass
            return (*found, key, False)
        with self._lock:  # tracing (seconds) one graph at a time; Inductor compiles on the first call, unlocked
            found = self._compiled.get(key)
            if found is not None:
                return (*found, key, False)
            started = time.perf_counter()
            size = tuple(images.shape[-2:])
            graph = self.layout.run(
                lambda last: trace_joint(self.model, layers, size, images.dtype, cams=True, channels_last=last)
            )
            classes = _logit_classes(graph)
            if images.is_cuda and bucket == 1:
                compiled = _replayed(torch.compile(graph, mode="reduce-overhead", dynamic=False))
            else:
                compiled = torch.compile(graph, dynamic=False)
            self._compiled[key] = (compiled, classes)
            self.compile_seconds[key] = time.perf_counter() - started
            while len(self._compiled) > MAX_GRAPHS:
                dropped, _ = self._compiled.popitem(last=False)
                logger.warning("more than %d compiled graphs: dropped the least recently used (%d layers at %s, "
                               "batches of %d)", MAX_GRAPHS, len(dropped[0]), dropped[1], dropped[4])
            return compiled, classes, key, True

    def run(self, images: Tensor, layers: Sequence[str], targets: object, kernels: TorchKernels) -> BackboneResult:
        """The CAM contraction runs inside the compiled graph (fused by Inductor), so ``kernels`` only
        normalises."""
        batch = images.shape[0]
        bucket = 1 << (batch - 1).bit_length()
        compiled, classes, key, fresh = self._get(layers, images, bucket)
        chosen = to_device(graph_targets(targets, batch, classes), images.device)
        if bucket > batch:
            images = torch.cat([images, images[-1:].expand(bucket - batch, *images.shape[1:])])
            chosen = torch.cat([chosen, chosen[-1:].expand(bucket - batch)])
        if self.layout.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        started = time.perf_counter()
        with torch.no_grad():  # the graph holds its own backward; trainable parameters must not make a second one
            outputs = [out[:batch] for out in compiled(images, chosen)]
        if fresh:
            self.compile_seconds[key] += time.perf_counter() - started
            logger.info("compiled %d layers at %s for batches of %d in %.1f s", len(layers), key[1], bucket, self.compile_seconds[key])
        logits, used = outputs[0], outputs[1]
        check_logits(logits)
        count = len(layers)
        maps = group_maps(outputs[2 : 2 + count], outputs[2 + count :])
        return BackboneResult(logits=logits, targets=used, maps=maps)


def _replayed(compiled: Callable[..., tuple[Tensor, ...]]) -> Callable[..., tuple[Tensor, ...]]:
    """A CUDA-graph-replayed function made safe to share: one call at a time, outputs copied."""
    lock = threading.Lock()

    def run(*args: Tensor) -> tuple[Tensor, ...]:
        with lock:
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(out.clone() for out in compiled(*args))

    return run


def _logit_classes(graph: torch.fx.GraphModule) -> int:
    """The number of classes, read off the traced graph's first output."""
    output = next(node for node in graph.graph.nodes if node.op == "output")
    return int(output.args[0][0].meta["val"].shape[1])
