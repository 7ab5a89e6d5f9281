"""What :func:`wcam.tune_malloc` changes: ``python bench/malloc.py [--models ...] [--batch 8] [--processes 3]``.

The malloc settings hold for a whole process and cannot be undone, so each setting runs in its own child
process, and the two alternate (``--processes`` of each). A child times, interleaved after warm-up, the floor
(forward + gradients w.r.t. the hooked conv outputs) and ``engine.explain`` on the eager backend, in the main
thread and in a worker thread (where a server or ``wcam video`` runs the network), and counts the minor page
faults, kernel CPU time and voluntary context switches (a thread going to sleep) per call. Prints the median
over the rounds of every child, per setting.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wcam  # noqa: E402
from wcam.benchmark.cases import ModelBench, photos  # noqa: E402
from wcam.benchmark.floor import floor  # noqa: E402

SETTINGS = ("system", "tuned")


def child(setting: str, models: list[str], batch: int, rounds: int) -> dict:
    """Per model, entry and thread: lists of (ms per image, and per call minor faults, kernel CPU ms and
    voluntary context switches)."""
    if setting == "tuned" and not wcam.tune_malloc():
        raise SystemExit("wcam.tune_malloc() was refused here")
    results: dict = {}
    for name in models:
        bench = ModelBench(name, ["eager"], torch.device("cpu"), "DEFAULT" if name == "efficientnet_lite0" else None)
        engine = bench.eager
        images = photos(batch, engine).contiguous(memory_format=torch.channels_last)
        bare = floor(engine.model, engine.layers)
        entries: dict[str, Callable[[], object]] = {
            "floor": lambda: bare(images), "explain": lambda: engine.explain(images, p=90.0)}
        for where in ("main", "thread"):
            measured: dict[str, list] = {label: [] for label in entries}

            def run() -> None:
                for round_ in range(rounds + 1):  # the first is the warm-up
                    order = list(entries.items()) if round_ % 2 else list(entries.items())[::-1]
                    for label, call in order:
                        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                        call()
                        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
                        if round_:
                            measured[label].append((seconds * 1e3 / batch, after.ru_minflt - before.ru_minflt,
                                                    (after.ru_stime - before.ru_stime) * 1e3,
                                                    after.ru_nvcsw - before.ru_nvcsw))

            if where == "main":
                run()
            else:
                worker = threading.Thread(target=run)
                worker.start()
                worker.join()
            for label, values in measured.items():
                results[f"{name} | {label} | {where}"] = values
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121", "efficientnet_lite0"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per child (after one warm-up)")
    parser.add_argument("--processes", type=int, default=2, help="children per setting, alternating")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.models, args.batch, args.rounds)))
        return
    pooled: dict[str, dict[str, list]] = {s: {} for s in SETTINGS}
    for _ in range(args.processes):
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--child", setting, "--models", *args.models,
                       "--batch", str(args.batch), "--rounds", str(args.rounds)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            for key, values in json.loads(done.stdout.splitlines()[-1]).items():
                pooled[setting].setdefault(key, []).extend(values)
    print(f"{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}; {torch.get_num_threads()} "
          f"threads; torch {torch.__version__}; batch {args.batch}; {args.processes} processes x {args.rounds} rounds "
          "per setting")
    print("| model | entry | thread | system ms/img | tuned ms/img | speed-up | faults/call system, tuned "
          "| kernel CPU ms/call system, tuned | sleeps/call system, tuned |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in pooled["system"]:
        (ms_s, f_s, k_s, v_s), (ms_t, f_t, k_t, v_t) = (
            [statistics.median(v[i] for v in pooled[s][key]) for i in range(4)] for s in SETTINGS)
        print(f"| {key} | {ms_s:.1f} | {ms_t:.1f} | {ms_s / ms_t:.2f}x | {f_s:.0f}, {f_t:.0f} | {k_s:.0f}, {k_t:.0f} "
              f"| {v_s:.0f}, {v_t:.0f} |")


if __name__ == "__main__":
    main()
