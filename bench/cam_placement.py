"""Where the eager torch path should do its CAM maths, measured: against the floor, interleaved, per model.

Three placements of the same numbers (checked equal first), each a full ``engine.explain(p=90)``:

- ``hooks``: channel weights and weighted channel sums both in a hook on each layer output, as its gradient
  appears (the design before this script);
- ``split``: channel weights in the hook (the gradient is in cache then), weighted sums after the backward
  (the activation was written in the forward and is read from memory wherever the sum runs), the backward
  asked only for the gradient roots so that each gradient is freed once used; the engine's;
- ``after``: everything after the backward, from the gradients ``autograd.grad`` returns.

    python bench/cam_placement.py [--models resnet50 densenet121 efficientnet_lite0] [--batch 8] [--rounds 12]
                                  [--fold-batch-norms]

With ``--fold-batch-norms`` the engine runs the batch-norm-folded network (and the floor is that network's):
there the op after a folded convolution (a ReLU's backward) reads its output during the backward, just before
the hook, which may leave it in cache for ``hooks``.

Prints ms per batch and the median of per-round ratios to the floor (with their interquartile range), then
the peak resident memory of two explains per placement, each in a fresh process (``--no-peak`` skips it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from typing import Callable, Sequence

import torch
from torch import Tensor

import wcam
import wcam.engine.runner as runner
from wcam.benchmark.cases import ModelBench, photos
from wcam.benchmark.floor import floor
from wcam.benchmark.timing import interleaved
from wcam.engine.batchnorm_folding import Affine
from wcam.kernels import LayerMaps, channel_weights, group_maps

Affines = Sequence[Affine | None] | None


def in_hooks(objective: Tensor, activations: list[Tensor], affines: Affines = None) -> LayerMaps:
    cams: list[Tensor] = [torch.empty(0)] * len(activations)
    scores: list[Tensor] = [torch.empty(0)] * len(activations)
    folds = affines or [None] * len(activations)

    def on_gradient(index: int, activation: Tensor) -> Callable[[Tensor], None]:
        def hook(gradient: Tensor) -> None:
            cams[index], scores[index] = runner.layer_cam(activation, channel_weights(gradient), folds[index])

        return hook

    handles = [a.register_hook(on_gradient(i, a.detach())) for i, a in enumerate(activations)]
    try:
        torch.autograd.grad(objective, activations)
    finally:
        for handle in handles:
            handle.remove()
    return group_maps(cams, scores)


def all_after(objective: Tensor, activations: list[Tensor], affines: Affines = None) -> LayerMaps:
    gradients = torch.autograd.grad(objective, activations)
    folds = affines or [None] * len(activations)
    cams, scores = zip(*(runner.layer_cam(a, channel_weights(g), f) for a, g, f in zip(activations, gradients, folds)))
    return group_maps(list(cams), list(scores))


PLACEMENTS = {"hooks": in_hooks, "split": runner._maps_during_backward, "after": all_after}


def placed(engine: wcam.Engine, images: Tensor, placement: str) -> Callable[[], wcam.Explanation]:
    def run() -> wcam.Explanation:
        saved = runner._maps_during_backward
        runner._maps_during_backward = PLACEMENTS[placement]
        try:
            return engine.explain(images, p=90.0)
        finally:
            runner._maps_during_backward = saved

    return run


def eager_engine(name: str, fold: bool) -> wcam.Engine:
    engines = ModelBench(name, ["eager"], torch.device("cpu"), None).engines
    return engines["eager, batch norms folded" if fold else "eager"]


def peak_mib(name: str, batch: int, placement: str, fold: bool) -> float:
    """Growth of the peak resident memory over two explains at ``placement``, in a fresh process (the peak
    cannot be reset in this one)."""
    wcam.tune_malloc()
    engine = eager_engine(name, fold)
    images = photos(batch, engine).contiguous(memory_format=torch.channels_last)
    before = high_water_kib()
    for _ in range(2):
        placed(engine, images, placement)()
    return (high_water_kib() - before) / 1024


def high_water_kib() -> int:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss``, not inherited across exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121", "efficientnet_lite0"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--fold-batch-norms", action="store_true", help="the engine with batch norms folded")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one placement's peak, in a child
    args = parser.parse_args()
    if args.peak_of:
        print(peak_mib(args.models[0], args.batch, args.peak_of, args.fold_batch_norms))
        return
    wcam.tune_malloc()
    for name in args.models:
        engine = eager_engine(name, args.fold_batch_norms)
        images = photos(args.batch, engine).contiguous(memory_format=torch.channels_last)
        runs = {placement: placed(engine, images, placement) for placement in PLACEMENTS}
        reference = runs["split"]().heatmaps  # folds the network first, where asked
        folded = engine._runner.folding.current if engine._runner.folding is not None else None
        if args.fold_batch_norms and folded is None:
            raise SystemExit(f"{name}: nothing folded")
        bare = floor(folded.module if folded is not None else engine.model, engine.layers)
        for placement, run in runs.items():
            diff = float((run().heatmaps - reference).abs().max())
            if diff > 1e-6:
                raise AssertionError(f"{placement} differs from split by {diff:.3g}")
        times = interleaved({"floor": lambda: bare(images), **runs}, args.rounds, 2, torch.device("cpu"))
        print(f"{name}, batch {args.batch}, {args.rounds} rounds{', batch norms folded' if folded else ''}")
        for label, values in times.items():
            ratios = [t / f for t, f in zip(values, times["floor"])]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f"  {label:6s} {statistics.median(values) * 1e3:8.1f} ms/batch   "
                  f"x floor {statistics.median(ratios):.3f} (IQR {q1:.3f}-{q3:.3f})")
        if not args.no_peak:
            for placement in PLACEMENTS:
                command = [sys.executable, __file__, "--models", name, "--batch", str(args.batch), "--peak-of", placement,
                           *(["--fold-batch-norms"] if args.fold_batch_norms else [])]
                mib = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
                print(f"  {placement:6s} peak resident memory grew by {mib:.0f} MiB over two explains")


if __name__ == "__main__":
    main()
