"""Explain a video frame by frame: decode, explain, draw and encode run as four stages joined by bounded queues.

The decoder (PyAV), the drawing of the heatmaps into the frames, and the encoder (PyAV, H.264) each run in a
thread of their own, and the network in the calling thread, so the slowest stage alone sets the rate (on a
CPU the network of one batch overlaps the drawing of the last) and at most a few batches of frames are in
memory on an endless stream. Frames stay in the decoder's planar YUV from decoding to encoding (the heatmap
is blended in YUV); only the frames the network explains are converted to RGB. Whatever stops the run (the
end of the input, a corrupt or truncated frame, Ctrl-C, an error in the engine) every frame explained so far
is drawn, the encoder flushed and the output file closed, so those frames stay playable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from wcam.engine.engine import Engine
from wcam.kernels.frames import YUVFrames
from wcam.kernels.resample import normalize_maps
from wcam.kernels.transfer import to_device
from wcam.overlay import TURBO_LUT
from wcam.video.codec import PRESETS, Colours, Decoder, Encoder, Picture, VideoError, pixel_format
from wcam.video.sidecar import Sidecars

logger = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class VideoOptions:
    """What ``wcam video`` does to each frame.

    ``every``: explain every N-th frame and reuse its heatmap for the frames between. ``smooth``: an
    exponential moving average over the heatmaps, ``m_t = smooth * m_(t-1) + (1 - smooth) * h_t`` on the
    normalised maps at the largest layer size (0 = off). ``size``: output ``(width, height)``, default the
    input's. ``alpha``: heatmap opacity in the overlay.
    """

    p: float = 90.0
    method: str = "winsor"
    batch_size: int = 8
    every: int = 1
    smooth: float = 0.0
    size: tuple[int, int] | None = None
    alpha: float = 0.5
    preset: str = "veryfast"  # one of PRESETS
    jsonl: Path | None = None
    npz: Path | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of libx264's: {', '.join(PRESETS)}; got {self.preset!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive int, got {self.every!r}")
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive int, got {self.batch_size!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")


@dataclass
class VideoSummary:
    """The outcome of a run: frames written, frames explained, busy seconds per stage, and the reason it
    stopped early (None when the whole input was explained)."""

    frames: int = 0
    explained: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "explain": 0.0, "draw": 0.0, "encode": 0.0})
    wall: float = 0.0
    stopped: str | None = None


def explain_video(
    engine: Engine,
    source: str,
    output: str | Path,
    options: VideoOptions = VideoOptions(),
    progress: Callable[[int], None] | None = None,
) -> VideoSummary:
    """Explain every frame of ``source`` (a file, URL or device PyAV opens) into an H.264 video at ``output``
    with the heatmap blended over each frame at the output resolution; the frame rate and timestamps are
    the input's. Raises :class:`VideoError` if the input cannot be opened or the output not written;
    problems met later end the run early with ``summary.stopped`` saying why and at which frame."""
    started = time.perf_counter()
    summary = VideoSummary()
    _check_distinct(source, output, options)
    decoder = Decoder(source)
    width, height = options.size or (decoder.width, decoder.height)
    encoder = None
    try:  # everything that can refuse to start does so before any thread runs
        encoder = Encoder(output, width, height, decoder.rate, options.preset, decoder.colours)
        sidecars = Sidecars(options.jsonl, options.npz, engine.categories)
        explainer = FrameExplainer(engine, options, (height, width), sidecars, decoder.colours)
    except BaseException:
        if encoder is not None:
            encoder.close()
        decoder.close()
        raise
    frames_in: queue.Queue = queue.Queue(maxsize=2 * options.batch_size)
    to_draw: queue.Queue = queue.Queue(maxsize=2)  # explained batches
    frames_out: queue.Queue = queue.Queue(maxsize=2 * options.batch_size)
    stop = threading.Event()
    problems: list[str] = []
    encode = threading.Thread(target=_encode, args=(encoder, frames_out, stop, summary, problems), name="wcam-encode", daemon=True)
    stream = torch.cuda.current_stream(engine.device) if engine.device.type == "cuda" else None
    draw = threading.Thread(target=_draw, args=(explainer, to_draw, frames_out, encode, stop, summary, problems, stream),
                            name="wcam-draw", daemon=True)
    threads = [
        threading.Thread(target=_decode, args=(decoder, (width, height), options.every, frames_in, stop, summary, problems),
                         name="wcam-decode", daemon=True),
        draw,
        encode,
    ]
    for thread in threads:
        thread.start()
    try:
        batch: list[tuple[int, Picture]] = []
        while True:
            item = frames_in.get()
            if item is not _END:
                batch.append(item)
            if batch and (item is _END or len(batch) == options.batch_size):
                tick = time.perf_counter()
                explained = explainer.explain(batch)
                summary.seconds["explain"] += time.perf_counter() - tick  # not the wait for the drawing below
                if not _hand_on(to_draw, explained, draw):
                    break  # the drawing thread has ended (it says why)
                if progress is not None:
                    progress(batch[-1][0] + 1)
                batch = []
            if item is _END or stop.is_set():
                break
    except KeyboardInterrupt:
        problems.append(f"interrupted at frame {explainer.next_index}")
    except Exception as exc:  # the engine failed on this batch: keep what was written, say where it stopped
        problems.append(f"stopped at frame {explainer.next_index}: {type(exc).__name__}: {exc}")
        logger.debug("engine failure", exc_info=True)
    finally:
        stop.set()
        _drain(frames_in)
        _hand_on(to_draw, _END, draw)  # the drawing thread draws what it holds, then ends the encoder
        for thread in threads:
            thread.join()
        explainer.close()
        decoder.close()
    summary.explained = explainer.explained
    summary.stopped = "; ".join(problems) or None
    summary.wall = time.perf_counter() - started
    return summary


def _hand_on(frames: queue.Queue, item: Any, consumer: threading.Thread) -> bool:
    """Put ``item`` on ``frames``, waiting while its consumer runs; False (item dropped) once it has ended."""
    while True:
        try:
            frames.put(item, timeout=0.1)
            return True
        except queue.Full:
            if not consumer.is_alive():
                return False


def _drain(frames: queue.Queue) -> None:
    """Empty a queue so that a producer blocked on ``put`` can see the stop flag and end."""
    try:
        while True:
            frames.get_nowait()
    except queue.Empty:
        pass


def _decode(
    decoder: Decoder,
    size: tuple[int, int],
    every: int,
    frames: queue.Queue,
    stop: threading.Event,
    summary: VideoSummary,
    problems: list[str],
) -> None:
    """Decode into ``(index, Picture)`` pairs at the output ``size`` (width, height), with RGB for every
    ``every``-th frame (the ones the network explains), until the end marker."""
    index = 0
    times: list[float] = []  # the first, the one before the last, and the last frame's time
    try:
        tick = time.perf_counter()
        for picture in decoder.frames(size, lambda i: i % every == 0):
            summary.seconds["decode"] += time.perf_counter() - tick
            times = [times[0], times[-1], picture.time] if times else [picture.time]
            while not stop.is_set():
                try:
                    frames.put((index, picture), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
            index += 1
            tick = time.perf_counter()
        problem = _missing_frames(index, decoder.declared_frames, decoder.declared_seconds, _covered(times, decoder.rate))
        if problem:
            problems.append(problem)
    except VideoError as exc:
        problems.append(f"corrupt input at frame {index}: {exc}")
    except Exception as exc:  # anything else (a conversion PyAV refuses, say): say so, the frames before it stay
        problems.append(f"cannot decode frame {index}: {type(exc).__name__}: {exc}")
        logger.debug("decoding failure", exc_info=True)
    finally:
        while True:  # the end marker must arrive, unless the explainer is gone
            try:
                frames.put(_END, timeout=0.1)
                break
            except queue.Full:
                if stop.is_set():
                    break


def _draw(
    explainer: "FrameExplainer",
    batches: queue.Queue,
    frames: queue.Queue,
    encode: threading.Thread,
    stop: threading.Event,
    summary: VideoSummary,
    problems: list[str],
    stream: "torch.cuda.Stream | None" = None,
) -> None:
    """Blend each explained batch into its frames and hand them to the encoder, until the end marker; after
    a failure (or once the encoder has ended), take and drop the batches still coming, so that the explaining
    thread never waits. On CUDA it runs on the explaining thread's device and stream, so that its kernels are
    ordered after that thread's."""
    try:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            failed = False
            while True:
                item = batches.get()
                if item is _END:
                    break
                if failed:
                    continue
                tick = time.perf_counter()
                try:
                    drawn = explainer.draw(item)
                except Exception as exc:
                    problems.append(f"cannot draw frame {item.batch[0][0]}: {type(exc).__name__}: {exc}")
                    logger.debug("drawing failure", exc_info=True)
                    failed = True
                    stop.set()
                    continue
                finally:
                    summary.seconds["draw"] += time.perf_counter() - tick
                failed = not all(_hand_on(frames, frame, encode) for frame in drawn)  # False: the encoder ended
    except Exception as exc:  # outside a batch's drawing (not expected): say so, so that the others stop
        problems.append(f"the drawing stage stopped: {type(exc).__name__}: {exc}")
        stop.set()
    finally:
        _hand_on(frames, _END, encode)


def _covered(times: list[float], rate: float) -> float | None:
    """Seconds of video the decoded frames cover, from the first, second-to-last and last frame times: up to
    the last frame's end, its length taken as the interval before it (the nominal one for a single frame), so
    that a variable frame rate's slow tail counts at its own pace. None when no frame was decoded."""
    if not times:
        return None
    interval = times[-1] - times[-2] if len(times) > 1 and times[-1] > times[-2] else 1.0 / float(rate)
    return times[-1] - times[0] + interval


def _missing_frames(decoded: int, declared: int, seconds: float | None, covered: float | None) -> str | None:
    """What to say when the input ends before what it declares: its frame count where it has one (MP4), else
    the duration of its video (Matroska) against the time the decoded frames cover, allowing 2% (at least a
    tenth of a second) for rounding; None when nothing is missing, or nothing is declared (MPEG-TS, a stream).
    Frames lost inside a file whose timestamps go on are not told (a variable frame rate looks the same)."""
    if declared:
        return f"the input ended at frame {decoded} of the {declared} it declares (truncated?)" if decoded < declared else None
    if seconds is None or covered is None or covered >= seconds - max(0.1, 0.02 * seconds):
        return None
    return f"the input ended at frame {decoded}, {covered:.2f} s into the {seconds:.2f} s it declares (truncated?)"


def _encode(encoder: Encoder, frames: queue.Queue, stop: threading.Event, summary: VideoSummary, problems: list[str]) -> None:
    try:
        while True:
            item = frames.get()
            if item is _END:
                break
            tick = time.perf_counter()
            encoder.write(*item)
            summary.frames += 1
            summary.seconds["encode"] += time.perf_counter() - tick
    except Exception as exc:  # VideoError from FFmpeg, or anything else: say so, and let the others stop
        reason = str(exc) if isinstance(exc, VideoError) else f"{type(exc).__name__}: {exc}"
        problems.append(f"cannot encode frame {summary.frames}: {reason}")
        logger.debug("encoding failure", exc_info=True)
        stop.set()
        _drain(frames)
    finally:
        tick = time.perf_counter()
        encoder.close()  # flush and finalise: the frames written so far stay playable
        summary.seconds["encode"] += time.perf_counter() - tick


@dataclass(frozen=True)
class ExplainedBatch:
    """One batch between the explaining and the drawing stage: ``(index, Picture)`` pairs, their YUV frames on
    the engine's device, their normalised maps at the layer size, their records."""

    batch: list[tuple[int, Picture]]
    frames: YUVFrames
    maps: torch.Tensor
    records: list[dict[str, Any]]


def _check_distinct(source: str, output: str | Path, options: VideoOptions) -> None:
    """Refuse a file written twice, or written while it is read: the encoder truncates its file on opening, so
    ``-o`` naming the input would destroy the video before a frame of it was decoded."""
    files = {"the input": Path(source), "the output": Path(output), "--jsonl": options.jsonl, "--npz": options.npz}
    seen: dict[object, str] = {}
    for role, path in files.items():
        if path is None or (role == "the input" and not path.is_file()):  # a URL or a device is no file
            continue
        try:  # an existing file by device and inode (links included), a new one by its resolved path
            key: object = (path.stat().st_dev, path.stat().st_ino)
        except OSError:
            key = path.resolve()
        if key in seen:
            raise VideoError(f"{role} and {seen[key]} are the same file ({path}): choose another")
        seen[key] = role


class FrameExplainer:
    """The engine's stages: :meth:`explain` explains every ``every``-th frame (in batches) and smooths;
    :meth:`draw` blends the heatmaps into the frames at the output size on the engine's device. Each takes
    the batches in order (``(index, Picture)`` pairs, the pictures at the output size); ``draw`` returns
    ``(flat YUV frame, time)`` pairs for the encoder."""

    def __init__(
        self, engine: Engine, options: VideoOptions, size: tuple[int, int], sidecars: Sidecars, colours: Colours = Colours()
    ) -> None:
        self.engine = engine
        self.options = options
        self.size = size
        self.sidecars = sidecars
        self.colours = colours
        self.lut = torch.from_numpy(TURBO_LUT.copy()).to(engine.device)
        self.last: tuple[torch.Tensor, dict[str, Any]] | None = None  # normalised map at layer size, its record
        self.next_index = 0
        self.explained = 0

    def run(self, batch: list[tuple[int, Picture]]) -> list[tuple[np.ndarray, float]]:
        """:meth:`explain` then :meth:`draw`, in this thread."""
        return self.draw(self.explain(batch))

    def explain(self, batch: list[tuple[int, Picture]]) -> "ExplainedBatch":
        """The network's part: upload the frames, explain every ``every``-th one, smooth; in frame order."""
        every = self.options.every
        device = self.engine.device
        chosen = [picture.rgb for index, picture in batch if index % every == 0]
        if any(image is None for image in chosen):
            raise ValueError(f"the frames to explain (every {every}-th) must come with their RGB pictures")
        fresh = iter(self._explain(to_device(torch.from_numpy(np.stack(chosen)), device))) if chosen else iter(())
        maps, records = [], []
        for index, picture in batch:
            if index % every == 0:
                current, record = next(fresh)
                if self.last is not None and self.options.smooth > 0:
                    current = self.options.smooth * self.last[0] + (1.0 - self.options.smooth) * current
                self.last = (current, record)
                self.explained += 1
            maps.append(self.last[0])
            records.append({"frame": index, "time": picture.time, "explained": index % every == 0, **self.last[1]})
        self.next_index = batch[-1][0] + 1
        height, width = self.size
        planes = to_device(torch.from_numpy(np.stack([picture.yuv for _, picture in batch])), device)  # one upload
        chroma = 2 if pixel_format(width, height) == "yuv420p" else 1
        frames = YUVFrames(planes, height, width, chroma, self.colours.matrix)
        return ExplainedBatch(batch, frames, torch.stack(maps), records)

    def draw(self, explained: "ExplainedBatch") -> list[tuple[np.ndarray, float]]:
        """The heatmaps blended into their frames (in place) at the output size, and the side outputs written."""
        frames, stacked = explained.frames, explained.maps
        kernels, interpolation = self.engine.kernels, self.engine.interpolation
        kernels.render(stacked, self.size, interpolation, frames=frames, alpha=self.options.alpha, lut=self.lut, out=frames)
        self.sidecars.write(explained.records, stacked, self.size, lambda: kernels.render(stacked, self.engine.preprocess.size, interpolation))
        return [(planes, picture.time) for (_, picture), planes in zip(explained.batch, frames.data.cpu().numpy())]

    def _explain(self, frames: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """Explain ``B x H x W x 3`` uint8 frames (on the device): normalised maps at the layer size and records."""
        explanation = self.engine.explain(frames.permute(0, 3, 1, 2), p=self.options.p, method=self.options.method)
        maps = normalize_maps(explanation.sums_at_layer_size)
        probabilities = explanation.probabilities.cpu()
        targets = explanation.targets.cpu().tolist()
        return [(maps[i], {"class": targets[i], "probability": float(probabilities[i, targets[i]])}) for i in range(len(frames))]

    def close(self) -> None:
        self.sidecars.close()
