"""What ``wcam bench`` times for one model and batch: the floor, Winsor-CAM on each wcam backend, wcam's
single-layer Grad-CAM, re-weighting for a new p, and the peers; each entry checked before it is timed."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from wcam.benchmark.floor import floor
from wcam.benchmark.peers import PEERS, Peer
from wcam.engine.engine import Engine
from wcam.engine.models import load_model

logger = logging.getLogger("wcam.benchmark")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # skimage.data photos, shipped in scikit-image's wheel
AGREEMENT = 1e-3  # wcam backends vs eager, max abs on normalised heatmaps (the bound the tests use)
REWEIGHT = 1e-5  # with_p(50) on cached maps vs a fresh explain at p=50 (same maps, same kernels)
PEER_GRADCAM = 1e-4  # a last-conv peer vs wcam's gradcam (same formula, other operation order: measured <= 4e-6)


FOLDED_FLOOR = "floor, batch norms folded (the network of wcam eager, batch norms folded)"


class BenchError(RuntimeError):
    """An entry that does not compute what it claims (wrong shape, constant or disagreeing output)."""


@dataclass(frozen=True)
class Entry:
    """One timed row: ``run`` computes the full result of the entry for the case's batch."""

    label: str
    group: str  # "floor", "wcam" or "peer"
    run: Callable[[], object]
    check: str  # what was verified before timing


@dataclass
class Case:
    model: str
    batch: int
    entries: list[Entry]
    notes: list[str] = field(default_factory=list)


def photos(batch: int, engine: Engine) -> Tensor:
    """``batch`` packaged photos (cycled; every second pass mirrored), preprocessed for ``engine``."""
    from skimage import data

    pictures = [getattr(data, name)() for name in PHOTOS]
    chosen = [pictures[i % len(pictures)] for i in range(batch)]
    chosen = [np.ascontiguousarray(p[:, ::-1]) if (i // len(pictures)) % 2 else p for i, p in enumerate(chosen)]
    images, _ = engine.preprocess(chosen, engine.device, engine.dtype)
    return images


def _max_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:  # never compare by broadcasting
        raise BenchError(f"heatmaps of shape {tuple(a.shape)} compared with {tuple(b.shape)}")
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


def _check_heatmaps(label: str, maps: object, shape: tuple[int, ...]) -> Tensor:
    """A peer's output must be ``B x H x W``, finite, and vary within every image."""
    if not isinstance(maps, Tensor) or tuple(maps.shape) != shape:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise BenchError(f"{label}: expected heatmaps of shape {shape}, got {got}")
    if not bool(torch.isfinite(maps).all()):
        raise BenchError(f"{label}: heatmaps hold NaN or Inf")
    flat = maps.reshape(maps.shape[0], -1)
    constant = (flat.amax(1) - flat.amin(1) <= 1e-6).nonzero()
    if len(constant):
        raise BenchError(f"{label}: the heatmap of image {int(constant[0])} is constant")
    return maps


class ModelBench:
    """The engines of one model (one per backend, built once), from which each batch's case is made.

    ``weights``: ``None`` for seeded random weights (the timing does not depend on their values; nothing is
    downloaded; the seed makes the peers' checks repeatable: on some random networks a last-layer Grad-CAM
    is all zeros for an image), else as :func:`wcam.engine.models.load_model`; ``size``: the network input
    (height, width), default the model's; ``cache_dir``: where ONNX graphs are exported (default, with the
    ``onnxruntime`` backend: a new temporary folder, left to the caller; ``wcam bench`` passes one it
    removes). Set-up costs (ONNX export, compilation) are recorded in ``setup``.
    """

    def __init__(
        self,
        name: str,
        backends: Sequence[str],
        device: torch.device,
        weights: str | None,
        cache_dir: Path | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        self.device = device
        with torch.random.fork_rng(devices=[]):  # seeded random weights, the caller's RNG state untouched
            torch.manual_seed(0)
            built = load_model(name, weights)
        preprocess = replace(built.preprocess, size=size) if size else built.preprocess
        self.setup: list[str] = []
        self.engines: dict[str, Engine] = {}
        kernel_sets = ["triton", "torch"] if device.type == "cuda" else ["torch"]
        exports = "onnxruntime" in backends  # a new temporary folder only when something is exported into it
        cache = cache_dir or (Path(tempfile.mkdtemp(prefix="wcam-bench-")) if exports else None)
        for backend in backends:
            for kernels in kernel_sets if backend == "eager" else kernel_sets[:1]:
                started = time.perf_counter()
                engine = Engine(built.model, device=device, preprocess=preprocess, backend=backend,
                                cache_dir=cache, kernels=kernels)
                label = f"{backend}, {kernels} kernels" if device.type == "cuda" else backend
                self.engines[label] = engine
                if backend == "eager" and kernels == "torch":  # the same with batch norms folded (opt-in)
                    self.engines[f"{label}, batch norms folded"] = Engine(
                        built.model, device=device, preprocess=preprocess, kernels=kernels, fold_batch_norms=True
                    )
                if backend == "onnxruntime":
                    mb = sum(f.stat().st_size for f in cache.rglob("*.onnx*")) / 2**20
                    self.setup.append(f"ONNX export + session: {time.perf_counter() - started:.1f} s, {mb:.1f} MB")
        self.eager = next(iter(self.engines.values()))
        if self.eager.backend != "eager":
            raise ValueError("the backends must include 'eager' (the reference the others are checked against)")

    def case(self, batch: int, peers: Sequence[Peer] = PEERS, backends: Sequence[str] | None = None) -> Case:
        """Build and check every entry for ``batch`` images, on the engines of ``backends`` (default: all; eager
        always); raises :class:`BenchError` on a failed check."""
        eager = self.eager
        engines = {k: e for k, e in self.engines.items() if backends is None or e.backend in backends or e is eager}
        images = photos(batch, eager)
        shape = (batch, *images.shape[-2:])
        # every torch entry gets the network input in the memory order wcam's eager engine gives its network
        # (channels-last on a CPU, where oneDNN runs it faster), so that none wins or loses by layout or by a
        # copy into it (ONNX Runtime, whose graph is NCHW, gets the batch as made); one more floor row runs on
        # the input as made
        given = images.contiguous(memory_format=torch.channels_last) if eager.channels_last else images
        reference = eager.explain(given, p=90.0)
        _check_heatmaps("wcam eager", reference.heatmaps, shape)  # the others are held to it: it must say something
        bare = floor(eager.model, eager.layers)
        entries = [Entry("floor: forward + activation gradients", "floor", lambda: bare(given), "")]
        if given is not images:  # what the channels-last layout saves on the network pass
            entries.append(Entry("floor, NCHW input", "floor", lambda: bare(images), ""))
        for label, engine in engines.items():
            started = time.perf_counter()
            fed = images if engine.backend == "onnxruntime" else given
            try:
                got = engine.explain(fed, p=90.0)
            except Exception as exc:  # Inductor needs a C++ compiler: a machine without one still gets its table
                if engine.backend != "compiled":
                    raise
                logger.warning("the compiled backend failed, not timed: %s: %s", type(exc).__name__, exc)
                self.setup.append(f"torch.compile failed, not timed: {type(exc).__name__}: {exc}")
                continue
            if engine.backend == "compiled":
                self.setup.append(f"torch.compile, batch {batch} (first call): {time.perf_counter() - started:.1f} s")
            diff = _max_diff(got.heatmaps, reference.heatmaps)
            if diff > AGREEMENT:
                raise BenchError(f"wcam {label}: heatmaps differ from eager by {diff:.3g} (> {AGREEMENT})")
            entries.append(Entry(f"wcam winsor p=90, {label}", "wcam",
                                 lambda e=engine, x=fed: e.explain(x, p=90.0), f"vs eager {diff:.1e}"))
            folding = getattr(engine._runner, "folding", None)
            if folding is not None and folding.current is not None:  # the floor of the network it runs
                bare_folded = floor(folding.current.module, eager.layers)
                floors = sum(e.group == "floor" for e in entries)
                entries.insert(floors, Entry(FOLDED_FLOOR, "floor", lambda: bare_folded(given),
                                             f"{folding.current.folded} folded"))
        gradcam = eager.explain(given, method="gradcam")
        entries.append(Entry(f"wcam gradcam (last conv), {next(iter(self.engines))}", "wcam",
                             lambda: eager.explain(given, method="gradcam"), ""))
        diff = _max_diff(reference.with_p(50.0).heatmaps, eager.explain(given, p=50.0).heatmaps)
        if diff > REWEIGHT:
            raise BenchError(f"wcam with_p(50) differs from explain(p=50) by {diff:.3g} (> {REWEIGHT})")
        entries.append(Entry("wcam with_p: new p on cached maps", "wcam", lambda: reference.with_p(50.0),
                             f"vs explain(p=50) {diff:.1e}"))
        same_as = {"gradcam": gradcam.heatmaps, "layer_mean": eager.explain(given, method="layer_mean").heatmaps}
        missing = []
        for peer in peers:
            if not peer.installed():
                missing.append(peer.package)
                continue
            run = peer.build(eager.model, eager.layers, eager.gradcam_layer, given)
            maps = _check_heatmaps(peer.label, run(), shape)
            diff = _max_diff(maps, same_as[peer.same_as])
            if peer.same_as == "gradcam" and diff > PEER_GRADCAM:
                raise BenchError(f"{peer.label}: differs from wcam's gradcam by {diff:.3g} (> {PEER_GRADCAM})")
            entries.append(Entry(peer.label, "peer", run, f"vs wcam {peer.same_as} {diff:.1e}"))
        if missing:
            note = (f"not installed, not timed: {', '.join(dict.fromkeys(missing))} "
                    "(pip install -e '.[bench]' in wcam's clone)")
            logger.warning(note)
            return Case(self.name, batch, entries, [note])
        return Case(self.name, batch, entries)
