"""``wcam eval``: score explanation methods on a dataset (localisation and faithfulness), write a per-image CSV
and print a summary table."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch import nn

from wcam import cli
from wcam.engine.engine import Engine
from wcam.eval import datasets
from wcam.eval.report import format_table, summarise, write_csv
from wcam.eval.runner import (
    CONVENTIONAL_GRADCAM_LAYERS,
    METHOD_KINDS,
    METRICS,
    SWEEP,
    TARGET_MODES,
    EvalError,
    EvalOptions,
    check_options,
    evaluate,
    methods_for,
)
from wcam.metrics.faithfulness import DEFAULT_STEPS

logger = logging.getLogger(__name__)


def add_eval(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from wcam.engine.models import MODELS

    sub = commands.add_parser(
        "eval",
        parents=parents,
        help="score explanation methods on a dataset",
        description="Explain every image of a dataset with each method and score the heatmaps (at the network "
        "input size) against the ground truth: IoU at Otsu's threshold and at a fixed one, centre-of-mass distance "
        "(pixels and /diagonal), pointing game, energy inside the object; and against the model: insertion and "
        "deletion AUC (RISE), average drop and increase in confidence. Writes one CSV line per image and method and "
        "prints each method's mean and 95% t-interval.",
        epilog="Folder layout (--data DIR): DIR/images/*, DIR/annotations.json = {\"images\": {\"<file>\": {\"boxes\": "
        "[[x0, y0, x1, y1], ...], \"label\": K}}} in original pixels, (x1, y1) exclusive; or DIR/masks/<stem>.png "
        "(non-zero = object). --voc DIR: an extracted VOCtrainval_11-May-2012.tar (VOCdevkit/VOC2012), val images "
        "with exactly one object class.",
    )
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="packaged photos with hand-annotated boxes (offline)")
    source.add_argument("--data", metavar="DIR", help="a folder of images with boxes or masks (layout below)")
    source.add_argument("--voc", metavar="DIR", help="PASCAL VOC 2012 (the folder holding VOCdevkit, or VOC2012)")
    sub.add_argument("--gt", choices=datasets.GROUND_TRUTHS, default="mask",
                     help="VOC ground truth: the class's segmentation pixels or its boxes (default: %(default)s)")
    sub.add_argument("--model", default=cli.DEFAULT_MODEL, metavar="NAME",
                     help=f"one of: {', '.join(MODELS)} (default: %(default)s)")
    sub.add_argument("--weights", default="DEFAULT", metavar="W",
                     help="DEFAULT, a torchvision weights name, 'none', or a state-dict file; a file's classifier "
                     "may have another number of classes (e.g. 20 for VOC) (default: %(default)s)")
    sub.add_argument("--methods", nargs="+", choices=METHOD_KINDS, default=list(METHOD_KINDS), metavar="M",
                     help=f"from: {', '.join(METHOD_KINDS)} (random: a seeded smooth random heatmap, the floor) "
                     "(default: all)")
    sub.add_argument("--p", nargs="+", type=cli._number_in("p", 0.0, 100.0), default=[90.0], metavar="P",
                     help="Winsor percentiles, one network pass for all (default: 90)")
    sub.add_argument("--sweep", action="store_true", help="Winsor-CAM at p = 0, 10, ..., 100 (instead of --p)")
    sub.add_argument("--gradcam-layer", nargs="+", metavar="NAME",
                     help="Grad-CAM layers (default: the last Conv2d, as in the paper, and the model's conventional "
                     "Grad-CAM layer where known)")
    sub.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), metavar="NAME",
                     help=f"from: {', '.join(METRICS)} (default: all)")
    sub.add_argument("--steps", type=cli._positive_int, default=DEFAULT_STEPS, metavar="N",
                     help="insertion/deletion steps: N + 1 forward passes per image and curve (RISE: 224 at 224x224) "
                     "(default: %(default)s)")
    sub.add_argument("--threshold", type=cli._number_in("threshold", 0.0, 1.0), default=0.5,
                     help="fixed threshold for iou_fixed (default: %(default)s)")
    sub.add_argument("--tolerance", type=cli._number_in("tolerance", 0.0, 1e4), default=0.0, metavar="PX",
                     help="pointing game tolerance in pixels at the input size (default: %(default)s)")
    sub.add_argument("--targets", choices=TARGET_MODES, default="auto",
                     help="class explained: the dataset's label, the model's top-1, or auto = label when every image "
                     "has one (default: %(default)s)")
    sub.add_argument("--csv", default="wcam-out/eval.csv", metavar="FILE",
                     help="per-image values (default: %(default)s)")
    sub.add_argument("--batch", type=cli._positive_int, default=8, metavar="N",
                     help="images per network pass (default: %(default)s)")
    sub.add_argument("--chunk", type=cli._positive_int, default=64, metavar="N",
                     help="perturbed images per forward pass for insertion/deletion (default: %(default)s)")
    sub.add_argument("--limit", type=cli._positive_int, metavar="N", help="only the first N images")
    sub.add_argument("--seed", type=int, default=0, help="seed of the random heatmaps (default: %(default)s)")
    sub.add_argument("--device", default="auto", help="torch device (default: cuda when available)")
    sub.set_defaults(func=cmd_eval)


def _fit_heads(model: nn.Module, state: dict) -> None:
    """Replace each ``nn.Linear`` whose weight in ``state`` has another number of outputs (a classifier
    fine-tuned to other classes) by a Linear of that size, so that the state dict loads."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2 and (
            weight.shape != module.weight.shape and weight.shape[1] == module.in_features
        ):
            parent, _, child = name.rpartition(".")
            head = nn.Linear(module.in_features, weight.shape[0], bias=f"{name}.bias" in state)
            setattr(model.get_submodule(parent) if parent else model, child, head)
            logger.info("%s: %d outputs from the weights file, not %d", name, weight.shape[0], module.out_features)


def _engine_from_file(args: argparse.Namespace) -> Engine:
    """The named model with a state-dict file whose classifier may have another number of classes."""
    from wcam.engine.models import WeightsFileError, load_model, pretrained_conventions, read_state_dict

    path = args.weights
    built = load_model(args.model, weights=None)
    pretrained_conventions(built.model)
    try:
        state = read_state_dict(path)
    except WeightsFileError as exc:
        raise cli.CliError(str(exc)) from None
    _fit_heads(built.model, state)
    try:
        built.model.load_state_dict(state)
    except RuntimeError as exc:
        raise cli.CliError(f"weights {path} do not fit {args.model}: {cli._reason(exc)}") from None
    built.model.eval().requires_grad_(False)
    outputs = [m.out_features for m in built.model.modules() if isinstance(m, nn.Linear)][-1:]
    categories = built.categories if built.categories is not None and outputs == [len(built.categories)] else None
    device = cli._resolve_device(args.device)
    return Engine(built.model, device=device, preprocess=built.preprocess, categories=categories)


def _engine(args: argparse.Namespace) -> Engine:
    if Path(args.weights).is_file():
        return _engine_from_file(args)
    fixed = {"size": None, "cache_dir": None, "interpolation": "bilinear", "backend": "eager"}
    network = argparse.Namespace(**{**vars(args), **fixed})
    return cli._build_engine(network)


def _dataset(args: argparse.Namespace) -> datasets.Dataset:
    try:
        if args.demo:
            dataset = datasets.demo()
        elif args.data is not None:
            dataset = datasets.folder(args.data)
        else:
            dataset = datasets.voc2012(args.voc, gt=args.gt)
    except datasets.DatasetError as exc:
        raise cli.CliError(str(exc)) from None
    if args.limit is not None:
        dataset = datasets.Dataset(dataset.name, dataset.samples[: args.limit], dataset.classes)
    return dataset


def cmd_eval(args: argparse.Namespace) -> int:
    """``wcam eval``: the dataset and the CSV's folder first (a bad path fails before the model loads), then
    the engine, the methods, the evaluation with a progress bar, the CSV and the summary table."""
    dataset = _dataset(args)
    options = EvalOptions(
        metrics=tuple(dict.fromkeys(args.metrics)), steps=args.steps, threshold=args.threshold,
        tolerance=args.tolerance, batch_size=args.batch, chunk=args.chunk, targets=args.targets, seed=args.seed,
    )
    target = Path(args.csv)
    cli._check_writable(target)
    try:
        check_options(dataset, options)
        engine = _engine(args)
        layers = args.gradcam_layer
        if layers is None:
            layers = [engine.gradcam_layer, CONVENTIONAL_GRADCAM_LAYERS.get(args.model, engine.gradcam_layer)]
        methods = methods_for(engine, args.methods, SWEEP if args.sweep else args.p, layers)
    except EvalError as exc:
        raise cli.CliError(str(exc), code=2) from None
    count = len(dataset.samples)
    print(
        f"wcam: eval {dataset.name}: {count} images, model={args.model} device={engine.device} steps={args.steps}; "
        f"methods: {', '.join(m.label for m in methods)}",
        flush=True,
    )
    progress = cli._Progress(count, enabled=True)
    started = time.perf_counter()
    try:
        rows = evaluate(engine, dataset, methods, options, progress=progress.update)
    except datasets.DatasetError as exc:
        raise cli.CliError(str(exc)) from None
    except EvalError as exc:
        raise cli.CliError(str(exc), code=2) from None
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, target, options.metrics)
    except OSError as exc:
        raise cli.CliError(f"cannot write {target}: {exc.strerror or cli._reason(exc)}") from exc
    print(format_table(summarise(rows, options.metrics), options.metrics))
    print(f"wcam: {count} images x {len(methods)} methods in {seconds:.1f} s; per-image values in {target}", flush=True)
    return 0
