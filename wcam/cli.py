"""The ``wcam`` command line: ``wcam explain IMAGE...`` writes heatmap overlays (with a torch model, or an
exported ONNX graph via ``--onnx``); ``wcam export MODEL -o FILE.onnx`` writes such a graph.

Exit codes: 0 success, 1 runtime error (missing or unreadable file, I/O, model or export failure), 2 usage
error (bad option, unknown model, layer or weights, bad p or size). Every error is one ``wcam: error: ...``
line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from wcam import Engine

logger = logging.getLogger("wcam.cli")

PROG = "wcam"
DEFAULT_MODEL = "efficientnet_lite0"
DEMO_PHOTOS = ("chelsea", "coffee")  # skimage.data photos shipped inside scikit-image's wheel


class CliError(Exception):
    """An error reported as one ``wcam: error: <message>`` line with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`CliError` (one line, status 2) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message, code=2)


# ------------------------------------------------------------------ argument types


def _number_in(what: str, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a float in [low, high] (NaN refused), with a message naming ``what``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be a number in [{low:g}, {high:g}], got {text!r}")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _size(text: str) -> tuple[int, int]:
    """An argparse type: two positive sizes ``AxB`` (e.g. 224x224), or ``N`` for N x N; returned in the order
    given (``wcam explain --size`` reads them as HxW, ``wcam video --size`` as WxH)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*,]\s*(\d+)\s*)?", text)
    if match is None or int(match[1]) < 1 or int(match[2] or match[1]) < 1:
        raise argparse.ArgumentTypeError(f"expected a size of two positive integers such as 224x224, got {text!r}")
    return int(match[1]), int(match[2] or match[1])


def _split_layers(items: Sequence[str] | None) -> list[str] | None:
    """``--layers`` values, commas also separating names; None when not given."""
    return [name for item in items or [] for name in item.split(",") if name] or None


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand registers its own subparser and handler (``func``)."""
    from wcam import __version__

    parser = _Parser(prog=PROG, description="Winsor-CAM explanations for CNNs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more diagnostics on stderr (-vv: debug)")
    parser.add_argument(
        "--system-malloc", action="store_true",
        help="leave glibc malloc as configured (default: keep freed tensor memory mapped between calls, "
        "wcam.tune_malloc; README, 'On a CPU')",
    )
    common = _Parser(add_help=False)  # options every subcommand also accepts after its name
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--system-malloc", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_explain(commands, [common])
    _add_export(commands, [common])
    from wcam.video.command import add_video

    add_video(commands, [common])
    from wcam.eval.command import add_eval

    add_eval(commands, [common])
    from wcam.benchmark.command import add_bench

    add_bench(commands, [common])
    return parser


def _add_explain(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from wcam.engine.engine import BACKENDS
    from wcam.engine.explanation import METHODS
    from wcam.engine.models import MODELS
    from wcam.kernels.resample import INTERPOLATIONS

    sub = commands.add_parser(
        "explain",
        parents=parents,
        help="write heatmap overlays for images",
        description="Explain each image's top-1 class and write OUT/<stem>_wcam.png (the heatmap over the "
        "photo at its original resolution).",
        epilog="IMAGE paths after --layers are taken as layer names; put them first or after '--'.",
    )
    sub.add_argument("images", nargs="*", metavar="IMAGE", help="image files (any format Pillow reads)")
    # --model, --weights, --size, --backend and --cache-dir default to None so that giving one together with
    # --onnx (which fixes all of them) can be refused; the real defaults are filled in by cmd_explain
    sub.add_argument("--model", metavar="NAME", help=f"one of: {', '.join(MODELS)} (default: {DEFAULT_MODEL})")
    sub.add_argument(
        "--weights",
        metavar="W",
        help="DEFAULT, a torchvision weights name, a state-dict file, or 'none' for random init (default: DEFAULT)",
    )
    sub.add_argument(
        "--onnx",
        metavar="FILE",
        help="explain with a graph written by 'wcam export' (run by ONNX Runtime) instead of --model/--weights; "
        "its layers, input size and class names come from the file",
    )
    sub.add_argument(
        "--size", type=_size, metavar="HxW", help="network input size, e.g. 320x320 (default: the model's, e.g. 224x224)"
    )
    sub.add_argument(
        "--backend",
        choices=BACKENDS,
        help="eager torch; compiled (torch.compile of the joint graph); onnxruntime (the graph exported once to "
        "--cache-dir, then run by ONNX Runtime) (default: eager)",
    )
    sub.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where --backend onnxruntime keeps exported graphs (default: $WCAM_CACHE or ~/.cache/wcam)",
    )
    sub.add_argument("--fold-batch-norms", action="store_true", help=FOLD_HELP)
    sub.add_argument("--p", type=_number_in("p", 0.0, 100.0), default=90.0, help="Winsor percentile in [0, 100] (default: %(default)s)")
    sub.add_argument("--method", choices=METHODS, default="winsor", help="(default: %(default)s)")
    sub.add_argument(
        "--layers",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="layer names to explain (default: the model's preset; for gradcam its last Conv2d); commas also separate",
    )
    sub.add_argument(
        "--interpolation", choices=INTERPOLATIONS, help="heatmap upsampling (default: bilinear; with --onnx the file's)"
    )
    sub.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="images per forward pass (default: %(default)s)")
    sub.add_argument("--alpha", type=_number_in("alpha", 0.0, 1.0), default=0.5, help="heatmap opacity in [0, 1] (default: %(default)s)")
    sub.add_argument("--out", default="wcam-out", metavar="DIR", help="output folder (default: %(default)s)")
    sub.add_argument("--npy", action="store_true", help="also write OUT/<stem>_wcam.npy (float32 heatmap, original size)")
    sub.add_argument("--demo", action="store_true", help="also explain packaged photos (skimage chelsea and coffee)")
    sub.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    sub.set_defaults(func=cmd_explain)


def _add_export(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from wcam.engine.models import MODELS
    from wcam.export.onnx_graph import GRAPHS
    from wcam.kernels.resample import INTERPOLATIONS

    sub = commands.add_parser(
        "export",
        parents=parents,
        help="export a model's graph to ONNX",
        description="Write MODEL as an ONNX graph with its metadata (layers, input size, normalisation, class "
        "names), so that the file alone serves explanations: 'features' (logits, activations, gradients; run it "
        "with 'wcam explain --onnx FILE') or 'full' (Winsor-CAM heatmaps, p a run-time input; for any ONNX runtime).",
    )
    sub.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(MODELS)}")
    sub.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    sub.add_argument(
        "--weights",
        default="DEFAULT",
        metavar="W",
        help="DEFAULT, a torchvision weights name, a state-dict file, or 'none' for random init (default: %(default)s)",
    )
    sub.add_argument("--graph", choices=GRAPHS, default="features", help="(default: %(default)s)")
    sub.add_argument(
        "--layers",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="layer names the graph exposes (default: the model's preset); commas also separate",
    )
    sub.add_argument(
        "--size", type=_size, metavar="HxW", help="input size, e.g. 320x320 (default: the model's: 224x224, 299x299 for inception_v3)"
    )
    sub.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        default="bilinear",
        help="heatmap upsampling recorded in (full: built into) the graph (default: %(default)s)",
    )
    sub.add_argument("--opset", type=_positive_int, metavar="N", help="ONNX opset version (default: the exporter's)")
    sub.add_argument("--optimize", action="store_true", help="run the exporter's graph optimiser (slow on large models)")
    sub.set_defaults(func=cmd_export)


# ------------------------------------------------------------------ inputs and outputs


@dataclass(frozen=True)
class _Input:
    """One image to explain: a display label, how to load it, and the stem its outputs are named after."""

    label: str
    stem: str
    load: Callable[[], np.ndarray]


def _load_file(path: str) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB, upright per its EXIF orientation."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as picture:
            picture = ImageOps.exif_transpose(picture)
            return np.asarray(picture.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise CliError(f"no such file: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable image"
        raise CliError(f"cannot read image {path}: {_reason(exc)}") from exc


def _check_file(path: str) -> None:
    """Fail fast, before the model loads: the file exists and Pillow recognises its format (header only)."""
    from PIL import Image

    if not os.path.exists(path):
        raise CliError(f"no such file: {path}")
    if os.path.isdir(path):
        raise CliError(f"is a directory, not an image: {path}")
    try:
        with Image.open(path):
            pass
    except Image.UnidentifiedImageError:
        raise CliError(f"cannot read image {path}: not a recognised image format") from None
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"cannot read image {path}: {_reason(exc)}") from exc


def _demo_inputs() -> list[_Input]:
    from skimage import data

    return [_Input(f"skimage.data.{name}", name, getattr(data, name)) for name in DEMO_PHOTOS]


def _unique_stems(stems: Sequence[str]) -> list[str]:
    """Output stems with duplicates numbered (x, x_2, x_3...), case-insensitively, so no output is overwritten."""
    used: set[str] = set()
    unique = []
    for stem in stems:
        candidate, n = stem, 1
        while candidate.casefold() in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate.casefold())
        unique.append(candidate)
    return unique


def _reason(exc: BaseException) -> str:
    """An exception's message on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _Progress:
    """A one-line ``[####----] 8/20 images 3.1/s`` bar on stderr, redrawn with carriage returns (TTY only);
    without a known total, just the count and the rate."""

    def __init__(self, total: int, enabled: bool, unit: str = "images") -> None:
        self.total = total
        self.unit = unit
        self.enabled = enabled and sys.stderr.isatty()
        self.done = 0
        self.start = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        if self.total:
            width = 24
            filled = min(width, width * self.done // self.total)
            bar = f"[{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total}"
        else:
            bar = str(self.done)
        sys.stderr.write(f"\r{bar} {self.unit} {rate:.1f}/s")
        sys.stderr.flush()

    def clear(self) -> None:
        """Erase a drawn bar so that a result line prints cleanly; the next update redraws it."""
        if self.enabled and self.done:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.enabled = False


def _batches(items: Sequence[_Input], size: int) -> Iterator[Sequence[_Input]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------ engines


# loggers and warnings of torch's ONNX exporter that talk on every export (e.g. onnx_ir's "Attribute type is
# ambiguous", torch.export's dynamic-axis notes); shown with -v
_EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo", "torch._export", "torch.fx")


@contextlib.contextmanager
def _quiet_exporter(verbosity: int) -> Iterator[None]:
    """Silence the exporter's warnings and log chatter (unless ``-v``), so that stderr stays for errors."""
    if verbosity > 0:
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


FOLD_HELP = (
    "eager backend: run the network with each batch norm folded into the convolution before it (on a 2-core CPU "
    "at batch 8: 1.35x faster on EfficientNet-Lite0, 1.12x on resnet50, bench/RESULTS.md; float32 heatmaps within "
    "~2e-4 of float64 instead of ~1e-5)"
)


def _weights(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _build_engine(args: argparse.Namespace) -> "Engine":
    """The engine for ``--model/--weights/--size/--backend/--device/--interpolation``, with load failures as
    one-line errors."""
    from wcam import Preprocess

    device = _resolve_device(args.device)
    weights = _weights(args.weights)
    fold = getattr(args, "fold_batch_norms", False)
    if fold and args.backend != "eager":
        raise CliError(f"--fold-batch-norms needs --backend eager, not {args.backend}", code=2)
    options: dict = {
        "device": device, "interpolation": args.interpolation, "backend": args.backend, "cache_dir": args.cache_dir,
        "fold_batch_norms": fold,
    }
    if args.size is not None:
        options["preprocess"] = Preprocess(size=args.size)
    logger.info("loading model %s (weights %s) on %s, backend %s", args.model, weights, device, args.backend)
    with _quiet_exporter(args.verbose):  # the onnxruntime backend exports the graph on first use
        return _named_engine(args.model, weights, options)


def _named_engine(model: str, weights: str | None, options: dict) -> "Engine":
    """``Engine.from_name`` with missing or unknown weights as one-line errors (bad files: WeightsFileError)."""
    from wcam import Engine, UnknownWeightsError

    try:
        return Engine.from_name(model, weights=weights, **options)
    except FileNotFoundError as exc:
        raise CliError(f"cannot load weights {weights!r} for {model}: {exc.strerror or _reason(exc)}") from exc
    except UnknownWeightsError as exc:
        raise CliError(str(exc), code=2) from exc


def _onnx_engine(args: argparse.Namespace) -> "Engine":
    """The engine on ``--onnx FILE`` (an exported features graph), with bad files as one-line errors naming it."""
    from wcam import Engine
    from wcam.export.onnx_graph import OnnxFormatError

    path = args.onnx
    if os.path.isdir(path):
        raise CliError(f"is a directory, not an ONNX file: {path}")
    device = _resolve_device(args.device)
    logger.info("loading ONNX graph %s on %s", path, device)
    try:
        engine = Engine.from_onnx(path, device=device, interpolation=args.interpolation)
    except FileNotFoundError:
        raise CliError(f"no such ONNX file: {path}") from None
    except OnnxFormatError as exc:  # corrupt, foreign, or a 'full' graph (the message says so and names the file)
        raise CliError(_reason(exc)) from exc
    return engine


# ------------------------------------------------------------------ explain


def cmd_explain(args: argparse.Namespace) -> int:
    """``wcam explain``: explain images in batches; write overlays (and heatmaps) named after each input."""
    from PIL import Image

    from wcam.overlay import overlay

    if args.onnx is not None:
        clashing = [flag for flag, value in (("--model", args.model), ("--weights", args.weights), ("--size", args.size),
                                             ("--cache-dir", args.cache_dir)) if value is not None]
        if args.backend not in (None, "onnxruntime"):
            clashing.append(f"--backend {args.backend}")
        if clashing:
            raise CliError(f"--onnx takes the model from the file; drop {', '.join(clashing)}", code=2)
    else:
        args.model = args.model or DEFAULT_MODEL
        args.weights = args.weights or "DEFAULT"
        args.backend = args.backend or "eager"
        args.interpolation = args.interpolation or "bilinear"

    layers = _split_layers(args.layers)
    inputs = _demo_inputs() if args.demo else []
    if not args.images and not inputs:
        files = [name for name in layers or [] if Path(name).is_file()]
        hint = (f" ({files[0]!r} was read as a layer name: --layers takes every word after it, so give the images"
                " before --layers)") if files else ""
        raise CliError(f"no images given: pass IMAGE paths or --demo{hint}", code=2)
    for path in args.images:  # before the model loads, so a typo fails in a second, not after a minute
        _check_file(path)
    inputs += [_Input(path, Path(path).stem, lambda path=path: _load_file(path)) for path in args.images]
    stems = _unique_stems([item.stem for item in inputs])

    engine = _onnx_engine(args) if args.onnx is not None else _build_engine(args)
    device = engine.device
    count = len(engine.layers_for(args.method, layers))

    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create output folder {out_dir}: {exc.strerror or _reason(exc)}") from exc
    p_text = f" p={args.p:g}" if args.method == "winsor" else ""
    source = f"onnx={args.onnx}" if args.onnx is not None else f"model={args.model}"
    untrained = "; random weights: the classes mean nothing" if args.onnx is None and args.weights.lower() == "none" else ""
    size = "x".join(map(str, engine.preprocess.size))
    print(
        f"wcam: method={args.method}{p_text} {source} backend={engine.backend} layers={count} size={size} "
        f"device={device} images={len(inputs)}{untrained}",
        flush=True,
    )

    categories = engine.categories or []
    progress = _Progress(len(inputs), enabled=len(inputs) > args.batch_size)
    index = 0
    try:
        for batch in _batches(inputs, args.batch_size):
            pictures = [item.load() for item in batch]
            started = time.perf_counter()
            explanation = engine.explain(pictures, p=args.p, method=args.method, layers=layers)
            logger.debug("batch of %d explained in %.2fs", len(batch), time.perf_counter() - started)
            probabilities = explanation.probabilities.cpu()
            targets = explanation.targets.cpu().tolist()
            for i, (item, picture) in enumerate(zip(batch, pictures)):
                stem = stems[index + i]
                heat = explanation.heatmap(i).detach().float().cpu().numpy()
                png = out_dir / f"{stem}_wcam.png"
                Image.fromarray(overlay(picture, heat, args.alpha)).save(png)
                written = str(png)
                if args.npy:
                    npy = out_dir / f"{stem}_wcam.npy"
                    np.save(npy, heat.astype(np.float32))
                    written += f", {npy}"
                top = int(probabilities[i].argmax())
                target = int(targets[i])
                progress.clear()
                print(
                    f"{item.label}: {_class_name(categories, top)} ({float(probabilities[i, top]):.1%}); "
                    f"explained {_class_name(categories, target)} [{target}] -> {written}",
                    flush=True,
                )
            index += len(batch)
            progress.update(len(batch))
    finally:
        progress.close()
    return 0


# ------------------------------------------------------------------ export


def _check_writable(target: Path) -> None:
    """Fail fast, before the model loads: ``target`` is not a folder and its nearest existing ancestor is a
    writable folder (the missing ones are created at write time)."""
    if target.is_dir():
        raise CliError(f"cannot write {target}: is a directory")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"cannot write {target}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {target}: permission denied on {ancestor}")


def cmd_export(args: argparse.Namespace) -> int:
    """``wcam export``: write MODEL's features or full graph to ONNX; print one summary line."""
    from wcam import Preprocess
    from wcam.export.decompositions import UnsupportedOpError
    from wcam.export.onnx_graph import export_onnx

    target = Path(args.output)
    _check_writable(target)
    weights = _weights(args.weights)
    options: dict = {"interpolation": args.interpolation}
    if args.size is not None:
        options["preprocess"] = Preprocess(size=args.size)
    logger.info("loading model %s (weights %s)", args.model, weights)
    engine = _named_engine(args.model, weights, options)

    started = time.perf_counter()
    note = sys.stderr.isatty()  # a progress note, as the bars are: seconds to minutes with nothing else to see
    if note:
        sys.stderr.write(f"exporting {args.model} to {target} (10 s to a few minutes on a CPU)...")
        sys.stderr.flush()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # export into a scratch folder beside the target, then rename: a failed export leaves no half file
        # (and a >2 GB model's external .data file is named after the final file)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wcam-export-") as scratch:
            with _quiet_exporter(args.verbose):
                info = export_onnx(
                    engine, Path(scratch) / target.name, layers=_split_layers(args.layers), graph=args.graph,
                    opset=args.opset, optimize=args.optimize,
                )
            produced = sorted(Path(scratch).iterdir())
            for file in produced:
                os.replace(file, target.parent / file.name)
    except UnsupportedOpError as exc:
        raise CliError(f"{args.model}: {exc}") from exc
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or _reason(exc)}") from exc
    finally:
        if note:  # erase the note: the summary line (or the error) takes its place
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    seconds = time.perf_counter() - started
    megabytes = sum((target.parent / file.name).stat().st_size for file in produced) / 1e6
    size = "x".join(map(str, info.input_size))
    print(
        f"wcam: exported {info.graph} graph of {args.model} ({len(info.layers)} layers, input {size}) "
        f"to {target} ({megabytes:.1f} MB) in {seconds:.1f} s",
        flush=True,
    )
    return 0


def _class_name(categories: Sequence[str], index: int) -> str:
    return categories[index] if 0 <= index < len(categories) else str(index)


# ------------------------------------------------------------------ entry point


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.getLogger("wcam").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="wcam: %(levelname)s: %(message)s", stream=sys.stderr)


def _error(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the ``wcam`` command line on ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from wcam import ImageError, TargetError, UnknownLayerError, UnknownModelError, WeightsFileError

    try:
        args = build_parser().parse_args(argv)
    except CliError as exc:
        return _error(str(exc), exc.code)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    _configure_logging(args.verbose)
    from wcam import allocator

    if args.system_malloc:
        args.malloc = "as configured (--system-malloc)"
    else:
        args.malloc = "wcam.tune_malloc" if allocator.tune_malloc() else "as configured (not glibc, or refused)"
    try:
        return int(args.func(args))
    except CliError as exc:
        return _error(str(exc), exc.code)
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (UnknownModelError, UnknownLayerError, TargetError) as exc:
        return _error(_reason(exc), 2)
    except (ImageError, WeightsFileError, FloatingPointError) as exc:  # bad inputs: images, a weights file, NaN logits
        return _error(_reason(exc), 1)
    except ValueError as exc:  # the engine's argument checks (p, method, layer sets, weights names)
        logger.debug("usage error", exc_info=True)
        return _error(_reason(exc), 2)
    except (OSError, RuntimeError) as exc:  # I/O, missing weights, torch failures (e.g. out of memory)
        logger.debug("runtime error", exc_info=True)
        return _error(_reason(exc), 1)
    except ImportError as exc:  # an optional dependency (the onnx extra) is missing: the message says which
        return _error(_reason(exc), 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
