"""The weighted channel sum ``cam[b] = sum_k alpha[b, k] A[b, k]`` over one model's hooked activations, as the
eager engine does it (:func:`wcam.kernels.weighted_channels`) against other torch and numpy formulations and
against merely reading the activations once, each with the cache flushed first (as after a backward).

    python bench/channel_sum.py [--model efficientnet_lite0] [--batch 8] [--repeats 7]

Prints the total ms over all layers (median per layer of ``--repeats`` runs), checking that each
formulation gives the engine's numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import wcam
from wcam.benchmark.cases import ModelBench, photos
from wcam.engine.capture import LayerCapture
from wcam.kernels import weighted_channels


def rows(a: Tensor) -> Tensor:
    """``B x hw x C``: a channels-last activation's memory as it is (a view)."""
    return a.permute(0, 2, 3, 1).reshape(a.shape[0], -1, a.shape[1])


READ_ONCE = "read once (sum over channels)"  # the yardstick: reads as much, computes something else

FORMULATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "engine (bmm, alpha x A^T)": lambda a, al: weighted_channels(a, al),
    READ_ONCE: lambda a, al: a.sum(dim=1),
    "einsum": lambda a, al: torch.einsum("bpc,bc->bp", rows(a), al),
    "mv per image": lambda a, al: torch.stack([torch.mv(r, w) for r, w in zip(rows(a), al)]),
    "mm over all images": lambda a, al: torch.mm(rows(a).reshape(-1, a.shape[1]), al.T)
    .view(a.shape[0], -1, a.shape[0]).diagonal(dim1=0, dim2=2).T,
    "1x1 conv2d per image": lambda a, al: torch.cat(
        [F.conv2d(a[i : i + 1], al[i].view(1, -1, 1, 1)) for i in range(a.shape[0])]
    ),
    "multiply then sum": lambda a, al: (a * al[:, :, None, None]).sum(dim=1),
    "multiply then sum, per image": lambda a, al: torch.stack(
        [(image * w[:, None, None]).sum(dim=0) for image, w in zip(a, al)]
    ),
    "numpy matmul": lambda a, al: torch.from_numpy(np.matmul(rows(a).numpy(), al.numpy()[:, :, None])),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    wcam.tune_malloc()
    engine = ModelBench(args.model, ["eager"], torch.device("cpu"), None).eager
    images = photos(args.batch, engine).contiguous(memory_format=torch.channels_last)
    with LayerCapture(engine.model, engine.layers) as capture, torch.no_grad():
        engine.model(images)
    activations = [a.detach() for a in capture.collect()]
    alphas = [torch.randn(a.shape[:2], generator=torch.Generator().manual_seed(i)) for i, a in enumerate(activations)]
    flush = torch.zeros(96 * 2**20 // 4)  # 96 MiB: three times this CPU's L3
    totals = dict.fromkeys(FORMULATIONS, 0.0)
    for a, alpha in zip(activations, alphas):
        expected = weighted_channels(a, alpha)
        for name, run in FORMULATIONS.items():
            got = run(a, alpha)
            if name != READ_ONCE and not torch.allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4):
                raise AssertionError(f"{name} disagrees with the engine on a layer of shape {tuple(a.shape)}")
            times = []
            for _ in range(args.repeats):
                flush.add_(1.0)
                start = time.perf_counter()
                run(a, alpha)
                times.append(time.perf_counter() - start)
            totals[name] += statistics.median(times)
    megabytes = sum(a.numel() * a.element_size() for a in activations) / 1e6
    print(f"{args.model}, batch {args.batch}: {len(activations)} layers, {megabytes:.0f} MB of activations")
    for name, seconds in totals.items():
        print(f"  {name:32s} {seconds * 1e3:7.2f} ms  ({megabytes / 1e3 / seconds:5.1f} GB/s)")


if __name__ == "__main__":
    main()
