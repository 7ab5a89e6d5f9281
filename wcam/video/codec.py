"""Reading and writing video with PyAV (FFmpeg), with failures as one-line :class:`VideoError`s."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)


class VideoError(RuntimeError):
    """A video that cannot be opened, decoded or written; the message names the file and the reason."""


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - a core dependency, but say so if it is missing
        raise VideoError("video needs PyAV: pip install av") from None
    return av


class Decoder:
    """Decodes the first video stream of a file, URL (rtsp://, http://) or device (``v4l2:/dev/video0``)
    into RGB frames of the first frame's size, with their presentation times in seconds."""

    def __init__(self, source: str) -> None:
        av = _av()
        kind, _, rest = source.partition(":")
        path, form = (rest, kind) if kind in ("v4l2", "avfoundation", "dshow") and rest else (source, None)
        try:
            self.container = av.open(path, "r", format=form)
        except FileNotFoundError:
            raise VideoError(f"no such video: {source}") from None
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise VideoError(f"cannot open {source}: {_reason(exc)}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{source} has no video stream")
        self.source = source
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.width = self.stream.codec_context.width
        self.height = self.stream.codec_context.height
        if not self.width or not self.height:
            self.container.close()
            raise VideoError(f"cannot read the frame size of {source} (unsupported codec?)")
        self.rate: Fraction = self.stream.average_rate or self.stream.guessed_rate or Fraction(25)
        self.declared_frames = int(self.stream.frames or 0)

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        """``(H x W x 3 uint8 RGB, time in seconds)`` per frame, in presentation order."""
        av = _av()
        try:
            for frame in self.container.decode(self.stream):
                when = float(frame.time) if frame.time is not None else 0.0
                yield frame.to_ndarray(format="rgb24", width=self.width, height=self.height), when
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(_reason(exc)) from None

    def close(self) -> None:
        self.container.close()


class Encoder:
    """Encodes RGB frames to H.264 (libx264 at the given preset) at a fixed frame rate, timestamps taken from
    the input frames' times; ``close`` flushes and finalises the file."""

    def __init__(self, path: str | Path, width: int, height: int, rate: Fraction, preset: str) -> None:
        av = _av()
        self.path = str(path)
        if not Path(self.path).resolve().parent.is_dir():
            raise VideoError(f"cannot write {self.path}: no such folder {Path(self.path).parent}")
        try:
            self.container = av.open(self.path, "w")
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot write {self.path}: {_reason(exc)}") from None
        try:
            self.stream = self.container.add_stream("libx264", rate=rate, options={"preset": preset})
        except (av.error.FFmpegError, ValueError) as exc:
            self.container.close()
            raise VideoError(f"cannot encode H.264 into {self.path}: {_reason(exc)}") from None
        self.stream.width, self.stream.height = width, height
        # yuv420p halves chroma in both directions and needs even sizes; odd sizes get full chroma
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.rate = rate
        self._last = -1
        self._closed = False

    def write(self, rgb: np.ndarray, when: float) -> None:
        av = _av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        self._last = max(round(when * self.rate), self._last + 1)  # strictly increasing, on the rate's grid
        frame.pts = self._last
        try:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(_reason(exc)) from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        av = _av()
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        except (av.error.FFmpegError, OSError) as exc:
            logger.warning("flushing %s failed: %s", self.path, _reason(exc))
        finally:
            self.container.close()


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
