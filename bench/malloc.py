"""What :func:`wcam.tune_malloc` changes: ``python bench/malloc.py [--models ...] [--batch 8] [--processes 2]
[--backend eager|onnxruntime]``.

The malloc settings hold for a whole process and cannot be undone, so each setting runs in its own child
process, and the settings alternate (``--processes`` children of each). Settings: ``system`` (malloc as
configured), ``thresholds`` (``tune_malloc(single_arena=False)``), ``tuned`` (``tune_malloc()``). A child times, interleaved after warm-up, the floor
(forward + gradients w.r.t. the hooked conv outputs) and ``engine.explain`` on ``--backend`` (ONNX graphs are
exported once, into wcam's cache folder, and reused by the later children), in the main
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
from wcam.export.cache import default_cache_dir  # noqa: E402

SETTINGS = {"system": None, "thresholds": {"single_arena": False}, "tuned": {}}  # tune_malloc's arguments


def child(setting: str, models: list[str], batch: int, rounds: int, backend: str) -> dict:
    """Per model, entry and thread: lists of (ms per image, and per call minor faults, kernel CPU ms and
    voluntary context switches)."""
    arguments = SETTINGS[setting]
    if arguments is not None and not wcam.tune_malloc(**arguments):
        raise SystemExit(f"wcam.tune_malloc({arguments}) was refused here")
    results: dict = {}
    for name in models:
        bench = ModelBench(name, list(dict.fromkeys(["eager", backend])), torch.device("cpu"),
                           "DEFAULT" if name == "efficientnet_lite0" else None, cache_dir=default_cache_dir())
        engine = bench.engines[backend]
        made = photos(batch, engine)
        images = made.contiguous(memory_format=torch.channels_last)  # the eager engine's layout
        fed = made if backend == "onnxruntime" else images  # ONNX Runtime's graph is NCHW
        bare = floor(bench.eager.model, bench.eager.layers)
        entries: dict[str, Callable[[], object]] = {
            "floor": lambda: bare(images), "explain": lambda: engine.explain(fed, p=90.0)}
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
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["system", "tuned"],
                        help="compared left to right; the speed-up is the first's time over the last's")
    parser.add_argument("--backend", choices=["eager", "onnxruntime"], default="eager", help="what explain runs on")
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.models, args.batch, args.rounds, args.backend)))
        return
    pooled: dict[str, dict[str, list]] = {s: {} for s in args.settings}
    for _ in range(args.processes):
        for setting in args.settings:
            command = [sys.executable, __file__, "--child", setting, "--models", *args.models,
                       "--batch", str(args.batch), "--rounds", str(args.rounds), "--backend", args.backend]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            for key, values in json.loads(done.stdout.splitlines()[-1]).items():
                pooled[setting].setdefault(key, []).extend(values)
    print(f"{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}; {torch.get_num_threads()} "
          f"threads; torch {torch.__version__}; batch {args.batch}; {args.processes} processes x {args.rounds} rounds "
          f"per setting; explain on {args.backend}")
    names = ", ".join(args.settings)
    print(f"| model | entry | thread | ms/img: {names} | speed-up | faults/call: {names} | kernel CPU ms/call: "
          f"{names} | sleeps/call: {names} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in pooled[args.settings[0]]:
        medians = [[statistics.median(v[i] for v in pooled[s][key]) for s in args.settings] for i in range(4)]
        ms, faults, kernel, sleeps = ([f"{x:.{digits}f}" for x in row] for row, digits in zip(medians, (1, 0, 0, 0)))
        print(f"| {key} | {', '.join(ms)} | {medians[0][0] / medians[0][-1]:.2f}x | {', '.join(faults)} | "
              f"{', '.join(kernel)} | {', '.join(sleeps)} |")


if __name__ == "__main__":
    main()
