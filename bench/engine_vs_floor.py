"""Engine vs floor, interleaved in one run: ``python bench/engine_vs_floor.py [--repeats N]``.

Each round times the floor and the engine (alternating which goes first) and ``with_p``, on the same model
and batch, so that machine noise hits them alike; the ratio is the median of the per-round ratios. Prints a
markdown table. Two ratio estimates: the median of per-round ratios, and the ratio of the fastest runs
(the least disturbed by other work on a shared machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import engine_fn, floor_fn, make_engine, make_images, with_p_fn  # noqa: E402


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(
        "| model | batch | floor ms/img | engine ms/img | engine / floor: median of rounds [min, max] "
        "| engine / floor: fastest runs | with_p ms/img |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        engine = make_engine(name)
        for batch in args.batches:
            images = make_images(batch)
            floor, full, reweight = floor_fn(engine, images), engine_fn(engine, images), with_p_fn(engine, images)
            for _ in range(args.warmup):
                floor(), full(), reweight()
            rows = []
            for round_ in range(args.repeats):
                if round_ % 2:
                    e, f = _time(full), _time(floor)
                else:
                    f, e = _time(floor), _time(full)
                rows.append((f, e, _time(reweight)))
            ratios = [e / f for f, e, _ in rows]
            f_ms = statistics.median(r[0] for r in rows) * 1e3 / batch
            e_ms = statistics.median(r[1] for r in rows) * 1e3 / batch
            w_ms = statistics.median(r[2] for r in rows) * 1e3 / batch
            fastest = min(r[1] for r in rows) / min(r[0] for r in rows)
            print(
                f"| {name} | {batch} | {f_ms:.1f} | {e_ms:.1f} | {statistics.median(ratios):.3f} "
                f"[{min(ratios):.2f}, {max(ratios):.2f}] | {fastest:.3f} | {w_ms:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
