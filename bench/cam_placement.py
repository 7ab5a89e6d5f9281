"""Where the eager torch path should do its CAM maths, measured: against the floor, interleaved, per model.

Three placements of the same numbers (checked equal first), each a full ``engine.explain(p=90)``:

- ``hooks``: channel weights and weighted channel sums both in a hook on each layer output, as its gradient
  appears (the design before this script);
- ``split``: channel weights in the hook (the gradient is in cache then), weighted sums after the backward
  (the activation was written in the forward and is read from memory wherever the sum runs), the backward
  asked only for the gradient roots so that each gradient is freed once used; the engine's;
- ``after``: everything after the backward, from the gradients ``autograd.grad`` returns.

    python bench/cam_placement.py [--models resnet50 densenet121 efficientnet_lite0] [--batch 8] [--rounds 12]

Prints ms per batch and the median of per-round ratios to the floor (with their interquartile range), then
the peak resident memory of two explains per placement, each in a fresh process (``--no-peak`` skips it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from typing import Callable

import torch
from torch import Tensor

import wcam
import wcam.engine.runner as runner
from wcam.benchmark.cases import ModelBench, photos
from wcam.benchmark.floor import floor
from wcam.benchmark.timing import interleaved
from wcam.kernels import LayerMaps, channel_cam, group_maps, layer_maps


def in_hooks(objective: Tensor, activations: list[Tensor]) -> LayerMaps:
    cams: list[Tensor] = [torch.empty(0)] * len(activations)
    scores: list[Tensor] = [torch.empty(0)] * len(activations)

    def on_gradient(index: int, activation: Tensor) -> Callable[[Tensor], None]:
        def hook(gradient: Tensor) -> None:
            cams[index], scores[index] = channel_cam(activation, gradient)

        return hook

    handles = [a.register_hook(on_gradient(i, a.detach())) for i, a in enumerate(activations)]
    try:
        torch.autograd.grad(objective, activations)
    finally:
        for handle in handles:
            handle.remove()
    return group_maps(cams, scores)


def all_after(objective: Tensor, activations: list[Tensor]) -> LayerMaps:
    gradients = torch.autograd.grad(objective, activations)
    return layer_maps([a.detach() for a in activations], list(gradients))


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


def peak_mib(name: str, batch: int, placement: str) -> float:
    """Growth of the peak resident memory over two explains at ``placement``, in a fresh process (the peak
    cannot be reset in this one)."""
    wcam.tune_malloc()
    engine = ModelBench(name, ["eager"], torch.device("cpu"), None).eager
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
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one placement's peak, in a child
    args = parser.parse_args()
    if args.peak_of:
        print(peak_mib(args.models[0], args.batch, args.peak_of))
        return
    wcam.tune_malloc()
    for name in args.models:
        engine = ModelBench(name, ["eager"], torch.device("cpu"), None).eager
        images = photos(args.batch, engine).contiguous(memory_format=torch.channels_last)
        bare = floor(engine.model, engine.layers)
        runs = {placement: placed(engine, images, placement) for placement in PLACEMENTS}
        reference = runs["split"]().heatmaps
        for placement, run in runs.items():
            diff = float((run().heatmaps - reference).abs().max())
            if diff > 1e-6:
                raise AssertionError(f"{placement} differs from split by {diff:.3g}")
        times = interleaved({"floor": lambda: bare(images), **runs}, args.rounds, 2, torch.device("cpu"))
        print(f"{name}, batch {args.batch}, {args.rounds} rounds")
        for label, values in times.items():
            ratios = [t / f for t, f in zip(values, times["floor"])]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f"  {label:6s} {statistics.median(values) * 1e3:8.1f} ms/batch   "
                  f"x floor {statistics.median(ratios):.3f} (IQR {q1:.3f}-{q3:.3f})")
        if not args.no_peak:
            for placement in PLACEMENTS:
                command = [sys.executable, __file__, "--models", name, "--batch", str(args.batch), "--peak-of", placement]
                mib = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
                print(f"  {placement:6s} peak resident memory grew by {mib:.0f} MiB over two explains")


if __name__ == "__main__":
    main()
