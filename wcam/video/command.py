"""``wcam video INPUT -o OUTPUT.mp4``: the heatmap of every frame blended over the video."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wcam import cli


def add_video(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from wcam.engine.engine import BACKENDS
    from wcam.engine.explanation import METHODS
    from wcam.engine.models import MODELS
    from wcam.video.codec import PRESETS

    sub = commands.add_parser(
        "video",
        parents=parents,
        help="explain a video frame by frame",
        description="Decode INPUT (a file, an rtsp:// or http:// URL, or a camera as v4l2:/dev/video0), explain "
        "every frame's top-1 class and write OUTPUT, an H.264 video with the heatmap blended over each frame, at "
        "the input's frame rate and timestamps. A corrupt or truncated input, or Ctrl-C, ends the run with the "
        "frames explained so far written and playable.",
    )
    sub.add_argument("input", metavar="INPUT", help="video file, URL or v4l2:/dev/videoN")
    sub.add_argument("-o", "--output", required=True, metavar="OUTPUT.mp4", help="the explained video")
    sub.add_argument("--model", default=cli.DEFAULT_MODEL, metavar="NAME", help=f"one of: {', '.join(MODELS)} (default: %(default)s)")
    sub.add_argument("--weights", default="DEFAULT", metavar="W", help="as for 'wcam explain' (default: %(default)s)")
    sub.add_argument("--backend", choices=BACKENDS, default="eager", help="(default: %(default)s)")
    sub.add_argument("--fold-batch-norms", action="store_true", help=cli.FOLD_HELP)
    sub.add_argument("--p", type=cli._number_in("p", 0.0, 100.0), default=90.0, help="Winsor percentile (default: %(default)s)")
    sub.add_argument("--method", choices=METHODS, default="winsor", help="(default: %(default)s)")
    sub.add_argument("--batch", type=cli._positive_int, default=8, metavar="N", help="frames per forward pass (default: %(default)s)")
    sub.add_argument("--every", type=cli._positive_int, default=1, metavar="N",
                     help="explain every N-th frame and reuse its heatmap in between (default: %(default)s)")
    sub.add_argument("--smooth", type=cli._number_in("smooth", 0.0, 0.999), default=0.0, metavar="A",
                     help="moving average over frames: m = A * previous + (1 - A) * current, 0 = off (default: %(default)s)")
    sub.add_argument("--size", type=cli._size, metavar="WxH",
                     help="output video size, width x height as video tools write it, e.g. 960x540 (not the network's "
                     "input size, which is the model's; default: the input's)")
    sub.add_argument("--alpha", type=cli._number_in("alpha", 0.0, 1.0), default=0.5, help="heatmap opacity (default: %(default)s)")
    sub.add_argument("--preset", choices=PRESETS, default="veryfast", metavar="PRESET",
                     help=f"libx264 preset: {', '.join(PRESETS)} (default: %(default)s)")
    sub.add_argument("--jsonl", type=Path, metavar="FILE", help="also write per-frame class, probability and heatmap centre of mass")
    sub.add_argument("--npz", type=Path, metavar="FILE", help="also write each frame's heatmap (network input size, float16)")
    sub.add_argument("--device", default="auto", help="torch device (default: cuda when available)")
    sub.set_defaults(func=cmd_video)


def cmd_video(args: argparse.Namespace) -> int:
    from wcam.video import VideoError, VideoOptions, explain_video

    source = args.input
    local = "://" not in source and not source.startswith(("v4l2:", "avfoundation:", "dshow:"))
    if local and not Path(source).is_file():
        raise cli.CliError(f"no such video: {source}")
    options = VideoOptions(
        p=args.p, method=args.method, batch_size=args.batch, every=args.every, smooth=args.smooth, size=args.size,
        alpha=args.alpha, preset=args.preset, jsonl=args.jsonl, npz=args.npz,
    )
    network = argparse.Namespace(**{**vars(args), "size": None, "cache_dir": None, "interpolation": "bilinear"})
    engine = cli._build_engine(network)
    progress = cli._Progress(_declared_frames(source) if local else 0, enabled=True, unit="frames")
    try:
        summary = explain_video(engine, source, args.output, options, progress=lambda done: progress.update(done - progress.done))
    except VideoError as exc:
        raise cli.CliError(str(exc)) from None
    finally:
        progress.close()
    if summary.frames == 0:  # nothing was written: say so, and leave no unplayable file behind
        Path(args.output).unlink(missing_ok=True)
        raise cli.CliError(f"{summary.stopped or f'no frame could be decoded from {source}'}; no frame was written")
    busy = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in summary.seconds.items())
    rate = summary.frames / max(summary.wall, 1e-9)
    print(f"wcam: {summary.frames} frames ({summary.explained} explained) -> {args.output} in {summary.wall:.1f} s, "
          f"{rate:.1f} frames/s; busy: {busy}", flush=True)
    if summary.stopped:
        sys.stderr.write(f"wcam: {summary.stopped}; the {summary.frames} frames before it are in {args.output}\n")
        return 1
    return 0


def _declared_frames(source: str) -> int:
    """The frame count a video file declares (0 when it declares none, or cannot be opened: explain_video then
    says why), for the progress bar's total."""
    from wcam.video.codec import Decoder, VideoError

    try:
        decoder = Decoder(source)
    except VideoError:
        return 0
    try:
        return decoder.declared_frames
    finally:
        decoder.close()
