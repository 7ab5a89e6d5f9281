"""End-to-end frames/s of ``wcam video``: ``python bench/video.py [--model efficientnet_lite0] [--every 1 3] [--backend eager]``.

Makes a 10-second 1920 x 1080 clip at 30 frames/s (a textured object moving over a textured background,
encoded once with libx264 ultrafast), then runs the whole pipeline on it (decode, explain, blend into the
1080p YUV planes, encode H.264) for each ``--every``, and prints frames/s end to end, the process's CPU time
per frame (all threads; what the stages compete for on a small CPU), each stage's busy seconds and the
process's peak resident memory. Stages run in parallel threads, so the wall time is set by the slowest
stage, not by their sum. ``--backend compiled`` compiles the network once first (its time is printed) and
then runs the same clip. glibc malloc is tuned as ``wcam video`` tunes it (``--system-malloc``: not).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wcam import Engine, tune_malloc  # noqa: E402
from wcam.engine.models import load_model  # noqa: E402
from wcam.video import VideoOptions, explain_video  # noqa: E402
from wcam.video.codec import Encoder  # noqa: E402


def make_clip(path: Path, seconds: float, fps: int, size: tuple[int, int]) -> int:
    """Write the benchmark clip; returns its frame count."""
    height, width = size
    rng = np.random.default_rng(0)
    background = rng.integers(0, 140, size=(height, width, 3), dtype=np.uint8)
    texture = rng.integers(120, 256, size=(height // 4, width // 8, 3), dtype=np.uint8)
    count = int(seconds * fps)
    encoder = Encoder(path, width, height, Fraction(fps), "ultrafast")
    for i in range(count):
        image = background.copy()
        x = (i * 11) % (width - texture.shape[1])
        image[height // 3 : height // 3 + texture.shape[0], x : x + texture.shape[1]] = texture
        encoder.write(av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p").to_ndarray().reshape(-1), i / fps)
    encoder.close()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--every", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1920x1080", help="clip WxH")
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--backend", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--system-malloc", action="store_true", help="as wcam's: leave glibc malloc as configured")
    args = parser.parse_args()
    tuned = not args.system_malloc and tune_malloc()  # as `wcam video` does
    width, height = map(int, args.size.split("x"))
    built = load_model(args.model, weights="DEFAULT" if args.model == "efficientnet_lite0" else None)
    built.model.to(device=args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    engine = Engine(built.model, preprocess=built.preprocess, categories=built.categories, backend=args.backend)
    print(f"{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads; device {args.device}; torch {torch.__version__}; PyAV {av.__version__}; model {args.model}; "
          f"{args.dtype}; backend {args.backend}; kernels {engine.kernels.name}; encoder preset {args.preset}; "
          f"malloc {'tuned' if tuned else 'as configured'}")
    with tempfile.TemporaryDirectory() as folder:
        clip = Path(folder) / "clip.mp4"
        started = time.perf_counter()
        count = make_clip(clip, args.seconds, 30, (height, width))
        print(f"clip: {count} frames, {width}x{height}, 30 frames/s, made in {time.perf_counter() - started:.1f} s")
        if args.backend == "compiled":  # compile outside the timing: every power-of-two bucket up to the batch's
            started = time.perf_counter()
            for batch in [1 << k for k in range((args.batch - 1).bit_length() + 1)]:
                engine.explain(torch.zeros((batch, 3, height, width), dtype=torch.uint8, device=args.device))
            print(f"compiled backend: compiling took {time.perf_counter() - started:.1f} s")
        print("| every | batch | frames | explained | wall s | frames/s | CPU ms/frame | decode s | explain s | draw s | encode s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for every in args.every:
            options = VideoOptions(batch_size=args.batch, every=every, preset=args.preset)
            cpu = _cpu_seconds()
            summary = explain_video(engine, str(clip), Path(folder) / f"out{every}.mp4", options)
            cpu = _cpu_seconds() - cpu
            if summary.stopped:
                raise SystemExit(f"the run stopped early: {summary.stopped}")
            s = summary.seconds
            print(f"| {every} | {args.batch} | {summary.frames} | {summary.explained} | {summary.wall:.1f} | "
                  f"{summary.frames / summary.wall:.1f} | {cpu / summary.frames * 1e3:.0f} | {s['decode']:.1f} | "
                  f"{s['explain']:.1f} | {s['draw']:.1f} | {s['encode']:.1f} |", flush=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"peak resident memory of the process: {peak:.0f} MiB (a longer --seconds shows whether it grows)")


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
