"""Backends side by side: ``python bench/backends.py [--models ...] [--batches 1 8] [--repeats N]``.

For each model: builds the eager, compiled and ONNX Runtime engines (reporting export time, file size and
compile time), checks that their heatmaps agree, then times ``explain`` on each backend interleaved, round
by round, after warm-up. Prints a markdown table of ms per image and the speed-up over eager torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import make_images  # noqa: E402

from wcam import Engine  # noqa: E402
from wcam.engine.models import load_model  # noqa: E402

BACKENDS = ("eager", "compiled", "onnxruntime")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    setup_rows, time_rows = [], []
    for name in args.models:
        built = load_model(name, "DEFAULT" if name == "efficientnet_lite0" else None)
        cache = Path(tempfile.mkdtemp(prefix="wcam-bench-"))
        engines = {}
        for backend in BACKENDS:
            started = time.perf_counter()
            engines[backend] = Engine(built.model, preprocess=built.preprocess, backend=backend, cache_dir=cache)
            setup = time.perf_counter() - started
            if backend == "onnxruntime":
                size_mb = sum(f.stat().st_size for f in cache.iterdir()) / 2**20
                setup_rows.append(f"| {name} | ONNX export + session | {setup:.1f} s | {size_mb:.1f} MB |")
        for batch in args.batches:
            images = make_images(batch)
            reference = engines["eager"].explain(images)
            for backend in BACKENDS[1:]:
                started = time.perf_counter()
                got = engines[backend].explain(images)  # the compiled backend compiles here
                first = time.perf_counter() - started
                diff = (got.heatmaps - reference.heatmaps).abs().max().item()
                if backend == "compiled":
                    setup_rows.append(f"| {name} | torch.compile, batch {batch} (first call) | {first:.1f} s | |")
                if diff > 1e-3:
                    raise SystemExit(f"{name} {backend} batch {batch}: heatmaps differ from eager by {diff:.3g}")
            for backend in BACKENDS:  # warm-up
                engines[backend].explain(images)
            times = {backend: [] for backend in BACKENDS}
            for round_ in range(args.repeats):
                order = BACKENDS if round_ % 2 == 0 else BACKENDS[::-1]
                for backend in order:
                    started = time.perf_counter()
                    engines[backend].explain(images)
                    times[backend].append(time.perf_counter() - started)
            eager_ms = statistics.median(times["eager"]) * 1e3 / batch
            cells = []
            for backend in BACKENDS:
                ms = statistics.median(times[backend]) * 1e3 / batch
                cells.append(f"{ms:.1f} ({eager_ms / ms:.2f}x)")
            time_rows.append(f"| {name} | {batch} | " + " | ".join(cells) + " |")
            print(time_rows[-1], flush=True)
    print("\n| model | step | time | file |\n| --- | --- | --- | --- |")
    print("\n".join(setup_rows))
    print("\n| model | batch | eager ms/img | compiled ms/img (speed-up) | onnxruntime ms/img (speed-up) |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(time_rows))


if __name__ == "__main__":
    main()
