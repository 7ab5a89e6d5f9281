"""Reading and writing video with PyAV (FFmpeg), with failures as one-line :class:`VideoError`s."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

# FFmpeg's AVColorSpace codes -> the YCbCr matrix swscale converts with (BT.601 for unspecified ones, as it)
_MATRICES = {1: "bt709", 4: "fcc", 5: "bt601", 6: "bt601", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
_SWSCALE = {"bt601": "ITU601", "bt709": "ITU709", "fcc": "FCC", "smpte240m": "SMPTE240M", "bt2020": "BT2020"}
_JPEG_RANGE = 2  # AVCOL_RANGE_JPEG: full-range values


PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")


@dataclass(frozen=True)
class Colours:
    """How the frames' YUV values map to colours: the YCbCr matrix (a key of
    :data:`wcam.kernels.frames.MATRICES`) and the H.273 tags the output carries: the input's, except a matrix
    tag the frames no longer follow. Frames reach the blend, and the output, in limited range whatever the
    input's."""

    matrix: str = "bt601"
    colorspace: int = 2  # unspecified
    primaries: int = 2
    transfer: int = 2


@dataclass(frozen=True)
class Picture:
    """A decoded frame: planar YUV at the output size (limited range; flat, the planes one after the other:
    yuv420p or yuv444p), its RGB at the input size when the network needs it, and its time in seconds."""

    yuv: np.ndarray
    rgb: np.ndarray | None
    time: float


def pixel_format(width: int, height: int) -> str:
    """The planar format frames are drawn and encoded in: 4:2:0 (H.264's usual) for even sizes, else 4:4:4."""
    return "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"


class VideoError(RuntimeError):
    """A video that cannot be opened, decoded or written; the message names the file and the reason."""


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - a core dependency, but say so if it is missing
        raise VideoError("video needs PyAV: pip install av") from None
    return av


class Decoder:
    """Decodes the first video stream of a file, URL (rtsp://, http://) or device (``v4l2:/dev/video0``):
    planar YUV to draw on, and RGB of the first frame's size for the network."""

    def __init__(self, source: str) -> None:
        av = _av()
        kind, _, rest = source.partition(":")
        path, form = (rest, kind) if kind in ("v4l2", "avfoundation", "dshow") and rest else (source, None)
        try:
            self.container = av.open(path, "r", format=form)
        except FileNotFoundError:
            raise VideoError(f"no such video: {source}") from None
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise VideoError(f"cannot open {source}: {_reason(exc)} (not a video, or a file cut short)") from None
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
        # the duration the input declares, where it is the video's own (a stream duration, or the container's
        # when the video is its only stream: an audio track may run longer); Matroska, say, declares no frame
        # count but a duration in its header, which a file cut short still carries
        if self.stream.duration is not None and self.stream.time_base is not None:
            self.declared_seconds: float | None = float(self.stream.duration * self.stream.time_base)
        elif self.container.duration and len(self.container.streams) == 1:
            self.declared_seconds = self.container.duration / av.time_base
        else:
            self.declared_seconds = None
        context = self.stream.codec_context
        tag = int(context.colorspace)
        # a matrix the blend cannot use (RGB's identity, YCgCo, ...): the frames are converted with BT.601, so
        # say so (6, SMPTE 170M); an untagged input stays untagged, as its pixels are passed on unchanged
        self.colours = Colours(_MATRICES.get(tag, "bt601"), tag if tag in _MATRICES or tag == 2 else 6,
                               int(context.color_primaries), int(context.color_trc))

    def frames(self, size: tuple[int, int], rgb: Callable[[int], bool]) -> Iterator[Picture]:
        """The frames in presentation order: planar YUV at ``size`` = (width, height), and RGB at the input
        size for the frames whose index ``rgb`` picks. Planes already in the output's format and size are
        taken as they are (one copy); others are resampled (swscale's bilinear) or converted."""
        av = _av()
        try:
            for index, frame in enumerate(self.container.decode(self.stream)):
                picture = frame.to_ndarray(format="rgb24", width=self.width, height=self.height) if rgb(index) else None
                when = float(frame.time) if frame.time is not None else 0.0
                yield Picture(planar(frame, size, self.colours.matrix), picture, when)
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(_reason(exc)) from None

    def close(self) -> None:
        self.container.close()


def planar(frame, size: tuple[int, int], matrix: str) -> np.ndarray:
    """One decoded frame (a PyAV ``VideoFrame``) as flat planar YUV at ``size`` = (width, height) in
    :func:`pixel_format`, limited range: full-range input (a yuvj format, or tagged so) is converted, others
    are taken as they are (one copy) when format and size already match; ``matrix`` is the input's, used
    where the input is RGB."""
    from av.video.reformatter import ColorRange

    width, height = size
    colorspace = _SWSCALE[matrix]
    full = frame.color_range == _JPEG_RANGE or frame.format.name.startswith("yuvj")
    converted = frame.reformat(width=width, height=height, format=pixel_format(width, height), src_colorspace=colorspace,
                               dst_colorspace=colorspace, src_color_range=ColorRange.JPEG if full else ColorRange.MPEG,
                               dst_color_range=ColorRange.MPEG)
    return converted.to_ndarray().reshape(-1)


class Encoder:
    """Encodes planar YUV frames (see :class:`Picture`) to H.264 (libx264 at the given preset) at a fixed frame
    rate, timestamps taken from the input frames' times, tagged with the input's colours; ``close`` flushes
    and finalises the file."""

    def __init__(self, path: str | Path, width: int, height: int, rate: Fraction, preset: str, colours: Colours = Colours()) -> None:
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
        self.stream.pix_fmt = pixel_format(width, height)
        context = self.stream.codec_context
        context.colorspace, context.color_primaries, context.color_trc = colours.colorspace, colours.primaries, colours.transfer
        context.color_range = 1  # limited (MPEG): what the frames hold
        self.shape = (height * 3 // 2, width) if self.stream.pix_fmt == "yuv420p" else (3, height, width)
        self.rate = rate
        self._last = -1
        self._closed = False

    def write(self, yuv: np.ndarray, when: float) -> None:
        """Encode one frame's flat planes (the stream's pixel format and size) shown at ``when`` seconds."""
        av = _av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(yuv).reshape(self.shape), format=self.stream.pix_fmt)
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
