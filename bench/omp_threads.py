"""Which thread runs torch matters on a CPU: ``python bench/omp_threads.py [--model efficientnet_lite0]``.

Times the floor (forward + gradients w.r.t. the hooked conv outputs, batch 8) in a fresh child process per
case, with glibc malloc tuned as the ``wcam`` command tunes it: ``main`` builds and runs everything in the
main thread; ``worker`` does all of it in one worker thread, the main thread running no torch op; ``worker
after main`` is the same after one parallel torch op in the main thread (what a server or a pipeline does
when its main thread has touched torch). Prints ms per image and the voluntary context switches per call of
the timing thread (torch's OpenMP workers going to sleep between parallel regions show up as the caller
waiting for them).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wcam  # noqa: E402
from wcam.benchmark.cases import ModelBench, photos  # noqa: E402
from wcam.benchmark.floor import floor  # noqa: E402

CASES = ("main", "worker", "worker after main")


def measure(model: str, rounds: int, out: dict) -> None:
    """Build the model and time its floor in the calling thread; results into ``out``."""
    bench = ModelBench(model, ["eager"], torch.device("cpu"), "DEFAULT" if model == "efficientnet_lite0" else None)
    images = photos(8, bench.eager).contiguous(memory_format=torch.channels_last)
    bare = floor(bench.eager.model, bench.eager.layers)
    bare(images)
    times, sleeps = [], []
    for _ in range(rounds):
        before, started = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        bare(images)
        times.append((time.perf_counter() - started) * 1e3 / 8)
        sleeps.append(resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before.ru_nvcsw)
    out.update(ms=statistics.median(times), sleeps=statistics.median(sleeps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--processes", type=int, default=2, help="children per case, alternating")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        wcam.tune_malloc()
        out: dict = {}
        if args.child == "main":
            measure(args.model, args.rounds, out)
        else:
            if args.child == "worker after main":
                torch.randn(2000, 2000).exp()  # one parallel op in the main thread
            worker = threading.Thread(target=measure, args=(args.model, args.rounds, out))
            worker.start()
            worker.join()
        print(json.dumps(out))
        return
    found: dict[str, list[dict]] = {case: [] for case in CASES}
    for _ in range(args.processes):
        for case in CASES:
            command = [sys.executable, __file__, "--child", case, "--model", args.model, "--rounds", str(args.rounds)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            found[case].append(json.loads(done.stdout.splitlines()[-1]))
    print(f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"{args.model}, batch 8; {args.processes} processes x {args.rounds} rounds per case")
    print("| case | ms/image per process | sleeps per call per process |\n| --- | --- | --- |")
    for case, runs in found.items():
        times = ", ".join(f"{run['ms']:.1f}" for run in runs)
        sleeps = ", ".join(f"{run['sleeps']:.0f}" for run in runs)
        print(f"| {case} | {times} | {sleeps} |")


if __name__ == "__main__":
    main()
