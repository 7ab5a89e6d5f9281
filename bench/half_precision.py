"""Half precision on the eager engine: what a bf16 (or fp16) model gains in speed and loses in the heatmaps.

The engine computes in its model's dtype, so ``Engine(model.to(torch.bfloat16))`` runs; this script says what
that does to the numbers and the time. Per model, a float32 engine and one on a copy of the model cast to each
dtype explain the same packaged photos at p=90; printed against float32:

- ``targets``: how many argmax classes stayed the same (the explained class);
- ``heatmaps``: the largest and the mean absolute difference of the normalised heatmaps;
- ``weights``: the largest difference of the winsorised layer weights (the scores are means of gradients,
  which largely cancel, so they are where low precision shows first);
- ``maps only``: the largest heatmap difference when the half-precision layer maps are combined with the
  float32 layer scores: what is left of the loss once the scores are exact;
- ms per image (median over rounds) and the median of per-round ratios float32 / half: the speed-up,
  timed interleaved after one warm-up round (malloc tuned, as ``wcam bench``).

    python bench/half_precision.py [--models efficientnet_lite0 resnet50] [--dtypes bfloat16] [--batch 8]
                                   [--rounds 5] [--device cpu]

EfficientNet-Lite0 runs its packaged pretrained weights; other models seeded random ones (``wcam bench``'s).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics

import torch

import wcam
from wcam.benchmark.cases import ModelBench, photos
from wcam.benchmark.timing import Summary, interleaved

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    wcam.tune_malloc()
    print("| model | dtype | targets kept | heatmaps max / mean | weights max | maps only max "
          "| float32 ms/image | half ms/image | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        pretrained = "DEFAULT" if name == "efficientnet_lite0" else None
        full = ModelBench(name, ["eager"], device, pretrained).eager
        images = photos(args.batch, full)
        if full.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        reference = full.explain(images, p=90.0)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            half = wcam.Engine(copy.deepcopy(full.model).to(dtype), layers=full.layers, preprocess=full.preprocess)
            low = images.to(dtype)
            got = half.explain(low, p=90.0)
            exact_scores = dataclasses.replace(got.layer_maps, scores=reference.layer_scores.to(got.layer_scores.dtype))
            maps_only = dataclasses.replace(got, layer_maps=exact_scores).with_p(90.0)
            diff = (got.heatmaps.float() - reference.heatmaps).abs()
            times = interleaved({"float32": lambda: full.explain(images, p=90.0),
                                 "half": lambda: half.explain(low, p=90.0)}, args.rounds, 1, device)
            speed = Summary.of(times["float32"], times["half"]).ratio
            ms = {k: statistics.median(v) * 1000 / args.batch for k, v in times.items()}
            print(f"| {name} | {dtype_name} | {int((got.targets == reference.targets).sum())}/{args.batch} "
                  f"| {diff.max():.2g} / {diff.mean():.2g} "
                  f"| {(got.layer_weights.float() - reference.layer_weights).abs().max():.2g} "
                  f"| {(maps_only.heatmaps.float() - reference.heatmaps).abs().max():.2g} "
                  f"| {ms['float32']:.1f} | {ms['half']:.1f} | {speed:.2f} |")


if __name__ == "__main__":
    main()
