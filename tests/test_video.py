"""Video: ``Engine.explain_stream``, ``explain_video`` and ``wcam video`` on short clips the tests make with PyAV
(a textured square moving over a textured background). The clips are small (96 x 64, a dozen frames) and the
network a seeded random resnet18 at 64 x 64, so the point is the plumbing, not the pictures.

Tolerances: heatmaps saved in the .npz are float16 (rounding 2^-11 ~ 5e-4 at 1.0), and a batch of frames and
a single frame run slightly different conv algorithms (~1e-6): 2e-3. The YUV planes the pipeline hands to
the encoder equal the float64 reference blend (``tests/reference_blend.py``) of the frame's decoded planes
with ``engine.explain(frame).heatmap(0)``, except where a heatmap value lies within ~1e-6 of a colour-table
step: there the colour is the neighbouring table entry, up to ``ceil(alpha * 13) + 1`` levels away (13: the
table's largest step in any plane), and such values must be rare (<= 0.2%; measured: at most 1 of a
plane's 1,536 chroma values); after H.264 (lossy, libx264 at
its default quality) and decoding to RGB, each output frame must be closer to the RGB overlay
``overlay(frame, heatmap)`` of its own frame than to any other frame's (mean abs error under 10 levels:
blending in YUV equals blending in RGB up to rounding and 4:2:0 chroma).
"""

from __future__ import annotations

import json
import zipfile
from fractions import Fraction
from itertools import islice
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from reference_blend import reference_yuv, yuv_table

from wcam import Engine, Preprocess
from wcam.cli import main
from wcam.kernels.resample import normalize_maps
from wcam.overlay import TURBO_LUT, overlay
from wcam.video import VideoOptions, explain_video
from wcam.video.codec import Decoder, Encoder, VideoError, planar
from wcam.video.pipeline import FrameExplainer
from wcam.video.sidecar import Sidecars

SIZE = (64, 96)  # frame height, width
FPS = 12
COLORSPACES = {0: "ITU601", 1: "ITU709", 2: "ITU601"}  # H.273 matrix tag -> swscale's name (0: RGB, none)


def make_video(path: Path, count: int = 12, faststart: bool = False, pix_fmt: str = "yuv420p", colorspace: int = 2,
               flat: bool = False, codec: str = "libx264") -> list[np.ndarray]:
    """Write a clip and return its frames as PyAV decodes them (the pixels the pipeline sees). ``pix_fmt``
    ``yuvj420p`` makes it full range; ``colorspace`` is its H.273 matrix tag (1: BT.709; 0: RGB, with codec
    ``libx264rgb`` and ``rgb24``); ``flat`` draws flat patches instead of noise, encoded losslessly."""
    rng = np.random.default_rng(0)
    background = rng.integers(0, 120, size=(*SIZE, 3), dtype=np.uint8)
    texture = rng.integers(150, 256, size=(20, 20, 3), dtype=np.uint8)
    if flat:
        background[:] = (30, 60, 90)
        background[:, SIZE[1] // 2 :] = (220, 200, 180)
        texture[:] = (250, 240, 20)
    container = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    stream = container.add_stream(codec, rate=FPS, options={"qp": "0"} if flat else {})
    stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], pix_fmt
    stream.codec_context.colorspace = colorspace
    for i in range(count):
        image = background.copy()
        x = 4 + 5 * i % (SIZE[1] - 24)
        image[22:42, x : x + 20] = texture
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt, dst_colorspace=COLORSPACES[colorspace])
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    return decode(path)[0]


def decode(path: Path) -> tuple[list[np.ndarray], list[float], Fraction]:
    """The frames, their times in seconds and the stream's average frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.time))
        return frames, times, stream.average_rate


def npz_frames(path: Path) -> dict[int, np.ndarray]:
    with np.load(path) as data:
        return {int(name[len("frame_") :]): data[name].astype(np.float32) for name in data.files}


@pytest.fixture(scope="module")
def engine(seeded_models):
    return Engine(seeded_models("resnet18"), preprocess=Preprocess(size=(64, 64)))


def test_explain_stream_yields_one_explanation_per_frame_in_order(engine, tmp_path):
    frames = make_video(tmp_path / "in.mp4", count=7)
    results = list(engine.explain_stream(iter(frames), batch_size=3, p=70.0))
    assert len(results) == 7
    for frame, got in zip(frames, results):
        single = engine.explain(frame, p=70.0)
        assert got.image_sizes == [SIZE] and len(got) == 1
        torch.testing.assert_close(got.heatmaps, single.heatmaps, rtol=0, atol=1e-5)
        assert got.targets.tolist() == single.targets.tolist()
        torch.testing.assert_close(got.heatmap(0), single.heatmap(0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        next(engine.explain_stream(frames, batch_size=0))


def test_a_stream_of_normalised_float_frames_gives_results_that_own_their_tensors(engine):
    """3 x H x W and 1 x 3 x H x W float frames are one image each; a kept result must not hold its batch."""
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    results = list(engine.explain_stream([x[0], x[1:2], x[2], x[3], x[4:5]], batch_size=2))
    whole = engine.explain(x)
    assert len(results) == 5
    torch.testing.assert_close(torch.cat([r.heatmaps for r in results]), whole.heatmaps, rtol=0, atol=1e-5)
    for got in results:
        tensors = [got.heatmaps, got.sums, got.logits, got.layer_scores, got.layer_weights, got.sums_at_layer_size,
                   got.layer_maps.scores, *(maps for _, maps in got.layer_maps.groups.values())]
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)


def test_explain_stream_takes_any_integer_class(engine, tmp_path):
    frames = make_video(tmp_path / "in.mp4", count=2)
    for target in (3, np.int64(3), torch.tensor(3)):
        assert [e.targets.tolist() for e in engine.explain_stream(frames, targets=target)] == [[3], [3]]
    for bad in (3.0, [3, 4], True):
        with pytest.raises(TypeError, match="one int class"):
            next(engine.explain_stream(frames, targets=bad))


def test_output_keeps_frame_count_size_rate_and_timestamps(engine, tmp_path):
    make_video(tmp_path / "in.mp4")
    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", VideoOptions(batch_size=5))
    assert summary.stopped is None and summary.frames == 12 and summary.explained == 12
    _, in_times, in_rate = decode(tmp_path / "in.mp4")
    out_frames, out_times, out_rate = decode(tmp_path / "out.mp4")
    assert len(out_frames) == 12
    assert out_frames[0].shape == (*SIZE, 3)
    assert out_rate == in_rate == Fraction(FPS)
    assert out_times == pytest.approx(in_times, abs=1e-6)
    assert set(summary.seconds) == {"decode", "explain", "draw", "encode"}


def test_each_frame_shows_its_own_heatmap(engine, tmp_path):
    frames = make_video(tmp_path / "in.mp4")
    options = VideoOptions(batch_size=4, npz=tmp_path / "heat.npz", jsonl=tmp_path / "frames.jsonl", alpha=0.6)
    explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", options)
    saved = npz_frames(tmp_path / "heat.npz")
    records = [json.loads(line) for line in (tmp_path / "frames.jsonl").read_text().splitlines()]
    assert sorted(saved) == list(range(12)) and [r["frame"] for r in records] == list(range(12))
    out_frames = decode(tmp_path / "out.mp4")[0]
    expected = []
    for frame, record in zip(frames, records):
        single = engine.explain(frame)
        np.testing.assert_allclose(saved[record["frame"]], single.heatmaps[0].numpy(), rtol=0, atol=2e-3)
        assert record["class"] == int(single.targets[0])
        assert record["probability"] == pytest.approx(float(single.probabilities[0, record["class"]]), abs=1e-5)
        x, y = record["center_of_mass"]
        assert 0 <= x < SIZE[1] and 0 <= y < SIZE[0]
        expected.append(overlay(frame, single.heatmap(0).numpy(), alpha=0.6).astype(np.float64))
    for i, got in enumerate(out_frames):
        errors = [np.abs(got.astype(np.float64) - e).mean() for e in expected]
        assert errors[i] < 10.0 and int(np.argmin(errors)) == i, (i, errors)
    # before encoding: the drawn YUV planes themselves, against the float64 reference of the blend
    decoder = Decoder(str(tmp_path / "in.mp4"))
    pictures = list(islice(decoder.frames((SIZE[1], SIZE[0]), lambda i: True), 5))
    decoder.close()
    stage = FrameExplainer(engine, VideoOptions(alpha=0.6), SIZE, Sidecars(None, None, None))
    jump = int(np.ceil(0.6 * np.abs(np.diff(yuv_table(TURBO_LUT), axis=0)).max())) + 1
    for index, ((drawn, when), picture) in enumerate(zip(stage.run(list(enumerate(pictures))), pictures)):
        assert when == picture.time and np.array_equal(picture.rgb, frames[index])
        heat = engine.explain(picture.rgb).heatmap(0).double().numpy()
        expected = reference_yuv(heat, yuv420_planes(picture.yuv), 2, 0.6, TURBO_LUT)
        for got, (low, high) in zip(yuv420_planes(drawn), expected):
            off = np.maximum(low - got, got - high).clip(min=0)
            assert off.max() <= jump and (off > 0).mean() <= 2e-3, (index, off.max(), int((off > 0).sum()))


def yuv420_planes(flat: np.ndarray) -> list[np.ndarray]:
    """The Y, U and V planes (int64) of one flat yuv420p frame of ``SIZE``."""
    h, w = SIZE
    values = flat.astype(np.int64)
    return [values[: h * w].reshape(h, w), values[h * w : h * w * 5 // 4].reshape(h // 2, w // 2),
            values[h * w * 5 // 4 :].reshape(h // 2, w // 2)]


def test_every_reuses_the_last_heatmap(engine, tmp_path):
    make_video(tmp_path / "in.mp4")
    options = VideoOptions(batch_size=4, every=3, npz=tmp_path / "heat.npz", jsonl=tmp_path / "frames.jsonl")
    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", options)
    assert summary.frames == 12 and summary.explained == 4
    records = [json.loads(line) for line in (tmp_path / "frames.jsonl").read_text().splitlines()]
    assert [r["explained"] for r in records] == [i % 3 == 0 for i in range(12)]
    saved = npz_frames(tmp_path / "heat.npz")
    for i in range(12):
        np.testing.assert_array_equal(saved[i], saved[i - i % 3])
        assert records[i]["class"] == records[i - i % 3]["class"]
    assert not np.array_equal(saved[0], saved[3])


def test_smooth_is_an_exponential_moving_average(engine, tmp_path):
    frames = make_video(tmp_path / "in.mp4", count=6)
    options = VideoOptions(batch_size=4, smooth=0.6, npz=tmp_path / "heat.npz")
    explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", options)
    saved = npz_frames(tmp_path / "heat.npz")
    average = None
    for i, frame in enumerate(frames):
        current = normalize_maps(engine.explain(frame).sums_at_layer_size)[0]
        average = current if average is None else 0.6 * average + 0.4 * current
        expected = engine.kernels.render(average[None], (64, 64), "bilinear")[0]
        np.testing.assert_allclose(saved[i], expected.numpy(), rtol=0, atol=2e-3, err_msg=f"frame {i}")
    with pytest.raises(ValueError, match="smooth"):
        VideoOptions(smooth=1.0)


def test_ctrl_c_keeps_the_frames_explained_so_far(engine, tmp_path):
    make_video(tmp_path / "in.mp4")

    def interrupt(done: int) -> None:
        if done == 6:
            raise KeyboardInterrupt

    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", VideoOptions(batch_size=3), interrupt)
    assert summary.stopped == "interrupted at frame 6"  # after the second batch of 3 was handed on
    assert summary.frames == 6
    assert len(decode(tmp_path / "out.mp4")[0]) == summary.frames


@pytest.mark.parametrize("stage", ["explain", "draw"])
def test_a_failing_stage_keeps_the_frames_before_it(engine, tmp_path, monkeypatch, stage):
    """An error in the network (the calling thread) or in the drawing (its own thread) on the third batch ends
    the run with the two batches before it drawn, encoded and playable, and a message naming the frame; the
    stages do not wait on each other after the failure."""
    make_video(tmp_path / "in.mp4")
    real = getattr(FrameExplainer, stage)

    def failing(self, batch):
        first = (batch if stage == "explain" else batch.batch)[0][0]
        if first == 6:
            raise RuntimeError("out of memory")
        return real(self, batch)

    monkeypatch.setattr(FrameExplainer, stage, failing)
    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", VideoOptions(batch_size=3))
    prefix = "stopped at frame 6" if stage == "explain" else "cannot draw frame 6"
    assert summary.stopped == f"{prefix}: RuntimeError: out of memory"
    assert summary.frames == 6 and len(decode(tmp_path / "out.mp4")[0]) == 6


@pytest.mark.parametrize("error", [VideoError("disk full"), ValueError("bad frame")])
def test_an_encoder_failure_keeps_the_frames_written_before_it(engine, tmp_path, monkeypatch, error):
    """The encoder failing at frame 6 (FFmpeg's error, or any other) ends the run with a message naming the
    frame, the six frames before it in a playable file, and no stage left waiting."""
    make_video(tmp_path / "in.mp4")
    real = Encoder.write
    written = []

    def failing(self, rgb, when):
        if len(written) == 6:
            raise error
        written.append(when)
        real(self, rgb, when)

    monkeypatch.setattr(Encoder, "write", failing)
    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", VideoOptions(batch_size=3))
    reason = "disk full" if isinstance(error, VideoError) else "ValueError: bad frame"
    assert summary.stopped == f"cannot encode frame 6: {reason}"
    assert summary.frames == 6 and len(decode(tmp_path / "out.mp4")[0]) == 6


def test_cli_truncated_input_leaves_a_playable_prefix(tmp_path, capsys):
    make_video(tmp_path / "whole.mp4", count=30, faststart=True)
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    readable = 0
    with av.open(str(tmp_path / "cut.mp4")) as container:
        try:
            for _ in container.decode(video=0):
                readable += 1
        except av.error.InvalidDataError:
            pass
    assert 0 < readable < 30
    code = main(["video", str(tmp_path / "cut.mp4"), "-o", str(tmp_path / "out.mp4"), "--model", "resnet18",
                 "--weights", "none", "--batch", "4"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"frame {readable}" in err and str(tmp_path / "out.mp4") in err
    assert len(decode(tmp_path / "out.mp4")[0]) == readable


def test_cli_progress_bar_knows_the_declared_frame_count(tmp_path, monkeypatch):
    import wcam.cli

    totals = []
    made = wcam.cli._Progress

    def recording(total, enabled, unit="images"):
        totals.append(total)
        return made(total, enabled, unit)

    monkeypatch.setattr(wcam.cli, "_Progress", recording)
    make_video(tmp_path / "in.mp4", count=5)
    assert main(["video", str(tmp_path / "in.mp4"), "-o", str(tmp_path / "out.mp4"), "--model", "resnet18",
                 "--weights", "none"]) == 0
    assert totals == [5]


def test_cli_truncated_matroska_is_named_by_its_declared_duration(tmp_path, capsys):
    """Matroska declares no frame count, but its header's duration survives a cut: 40 frames at 12 frames/s."""
    make_video(tmp_path / "whole.mkv", count=40)
    decoder = Decoder(str(tmp_path / "whole.mkv"))
    assert decoder.declared_frames == 0 and decoder.declared_seconds == pytest.approx(40 / FPS, abs=0.01)
    decoder.close()
    data = (tmp_path / "whole.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    with av.open(str(tmp_path / "cut.mkv")) as container:
        readable = sum(1 for _ in container.decode(video=0))
    assert 0 < readable < 40
    code = main(["video", str(tmp_path / "cut.mkv"), "-o", str(tmp_path / "out.mp4"), "--model", "resnet18",
                 "--weights", "none", "--batch", "4"])
    err = capsys.readouterr().err
    assert code == 1
    covered = readable / FPS  # frames at the nominal rate, the last one's length included
    assert f"the input ended at frame {readable}, {covered:.2f} s into the 3.33 s it declares (truncated?)" in err
    assert len(decode(tmp_path / "out.mp4")[0]) == readable


def test_cli_input_with_no_decodable_frame_writes_nothing(tmp_path, capsys):
    make_video(tmp_path / "whole.mkv", count=40)
    data = (tmp_path / "whole.mkv").read_bytes()
    (tmp_path / "head.mkv").write_bytes(data[: len(data) // 5])  # the header and no whole frame
    code = main(["video", str(tmp_path / "head.mkv"), "-o", str(tmp_path / "out.mp4"), "--model", "resnet18",
                 "--weights", "none"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.endswith("no frame was written") and not (tmp_path / "out.mp4").exists()
    assert "out.mp4" not in captured.out


@pytest.mark.parametrize(
    ("decoded", "declared", "seconds", "times", "message"),
    [
        (30, 30, None, [0.0, 1.12, 1.16], None),
        (19, 50, None, [0.0, 0.68, 0.72], "the input ended at frame 19 of the 50 it declares (truncated?)"),
        (50, 0, 2.0, [0.0, 1.92, 1.96], None),  # up to 2.0 s: complete
        (48, 0, 2.0, [0.0, 1.84, 1.88], None),  # 0.08 s short: within a tenth of a second
        (42, 0, 2.0, [0.0, 1.6, 1.64], "the input ended at frame 42, 1.68 s into the 2.00 s it declares"),
        (68, 0, 10.0, [0.0, 8.0, 9.0], None),  # a variable rate: 30 frames/s, then 1 frame/s to the end
        (1, 0, 10.0, [0.0], "the input ended at frame 1, 0.04 s into the 10.00 s it declares"),
        (10, 0, None, [0.0, 0.32, 0.36], None),  # nothing declared (MPEG-TS, a stream): nothing to say
    ],
)
def test_missing_frames_are_judged_against_what_the_input_declares(decoded, declared, seconds, times, message):
    from wcam.video.pipeline import _covered, _missing_frames

    said = _missing_frames(decoded, declared, seconds, _covered(times, 25.0))
    assert said is None if message is None else message in said


def test_a_complete_variable_rate_matroska_is_not_called_truncated(engine, tmp_path):
    """30 frames/s for 2 s, then 1 frame/s for 3 s: the average rate would predict far more frames."""
    container = av.open(str(tmp_path / "vfr.mkv"), "w")
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
    stream.codec_context.time_base = Fraction(1, 30)
    rng = np.random.default_rng(1)
    stamps = [*range(60), *range(60, 150, 30)]
    for pts in stamps:
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, Fraction(1, 30)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    summary = explain_video(engine, str(tmp_path / "vfr.mkv"), tmp_path / "out.mp4", VideoOptions(batch_size=8))
    assert summary.frames == len(stamps) and summary.stopped is None


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["video", "missing.mp4", "-o", "out.mp4"], 1, "no such video"),
        (["video", "{text}", "-o", "out.mp4", "--model", "resnet18", "--weights", "none"], 1, "cannot open"),
        (["video", "{clip}", "-o", "out.mp4", "--every", "0"], 2, "every"),
        (["video", "{clip}", "-o", "out.mp4", "--smooth", "1.5"], 2, "smooth"),
        (["video", "{clip}", "-o", "out.mp4", "--preset", "fastest"], 2, "invalid choice: 'fastest'"),
        (["video", "{clip}", "-o", "no/such/dir/out.mp4", "--model", "resnet18", "--weights", "none"], 1, "cannot write"),
        (["video", "{clip}", "-o", "./{clip}", "--model", "resnet18", "--weights", "none"], 1, "same file"),
        (["video", "{clip}", "-o", "out.mp4", "--jsonl", "out.mp4", "--model", "resnet18", "--weights", "none"], 1,
         "same file"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.mp4").write_text("not a video")
    make_video(tmp_path / "clip.mp4", count=2)
    args = [a.format(text="notes.mp4", clip="clip.mp4") for a in args]
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert len(decode(tmp_path / "clip.mp4")[0]) == 2  # the input is never touched


def test_cli_writes_video_and_sidecars(tmp_path, capsys):
    make_video(tmp_path / "in.mp4")
    code = main(["video", str(tmp_path / "in.mp4"), "-o", str(tmp_path / "out.mp4"), "--model", "resnet18",
                 "--weights", "none", "--every", "2", "--size", "48x32", "--jsonl", str(tmp_path / "f.jsonl"),
                 "--npz", str(tmp_path / "h.npz")])
    assert code == 0
    out = capsys.readouterr().out
    assert "12 frames (6 explained)" in out and "decode" in out and "encode" in out
    frames = decode(tmp_path / "out.mp4")[0]
    assert len(frames) == 12 and frames[0].shape == (32, 48, 3)
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 12
    assert len(zipfile.ZipFile(tmp_path / "h.npz").namelist()) == 12


def test_full_range_bt709_input_keeps_its_colours(engine, tmp_path):
    """A full-range, BT.709-tagged input (a webcam's MJPEG-style range, HD's matrix): the overlays are drawn
    with the BT.709 colours, the output is limited range and tagged BT.709, and with alpha 0 it shows the
    input's colours (flat patches, lossless input: mean error under 2 levels; read as limited range without
    conversion it would be off by ~10)."""
    frames = make_video(tmp_path / "in.mp4", count=6, pix_fmt="yuvj420p", colorspace=1, flat=True)
    decoder = Decoder(str(tmp_path / "in.mp4"))
    assert decoder.colours.matrix == "bt709"
    pictures = list(islice(decoder.frames((SIZE[1], SIZE[0]), lambda i: True), 3))
    decoder.close()
    explained = FrameExplainer(engine, VideoOptions(), SIZE, Sidecars(None, None, None), decoder.colours).explain(list(enumerate(pictures)))
    assert explained.frames.matrix == "bt709" and not explained.frames.full_range
    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", VideoOptions(batch_size=4, alpha=0.0))
    assert summary.stopped is None and summary.frames == 6
    with av.open(str(tmp_path / "out.mp4")) as container:
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_range, context.format.name) == (1, 1, "yuv420p")
    for got, want in zip(decode(tmp_path / "out.mp4")[0], frames):
        assert np.abs(got.astype(np.float64) - want).mean() < 2.0


def test_odd_output_size_is_drawn_in_full_chroma(engine, tmp_path):
    """An odd output size cannot be 4:2:0: frames are drawn and encoded as 4:4:4, at the asked size."""
    make_video(tmp_path / "in.mp4", count=5)
    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", VideoOptions(batch_size=2, size=(47, 33)))
    assert summary.stopped is None and summary.frames == 5
    out_frames = decode(tmp_path / "out.mp4")[0]
    assert len(out_frames) == 5 and out_frames[0].shape == (33, 47, 3)
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert container.streams.video[0].codec_context.format.name == "yuv444p"


def test_full_range_planes_tagged_as_such_are_converted_to_limited_range():
    """HEVC and AV1 decoders hand full-range frames as yuv420p tagged JPEG range (H.264's as yuvj420p): both
    become limited range (16 + 219/255 Y for luma), untagged and limited frames pass unchanged."""
    values = np.zeros(64 * 48 * 3 // 2, dtype=np.uint8)
    values[: 64 * 48] = np.linspace(0, 255, 64 * 48).astype(np.uint8)
    values[64 * 48 :] = 128
    frame = av.VideoFrame.from_ndarray(values.reshape(72, 64), format="yuv420p")
    assert np.array_equal(planar(frame, (64, 48), "bt601"), values)
    frame.color_range = 2  # JPEG: full range
    luma = planar(frame, (64, 48), "bt601")[: 64 * 48].astype(np.float64)
    np.testing.assert_allclose(luma, 16 + values[: 64 * 48].astype(np.float64) * 219 / 255, atol=1.0)
    yuvj = frame.reformat(format="yuvj420p")
    np.testing.assert_allclose(planar(yuvj, (64, 48), "bt601")[: 64 * 48], luma, atol=1.0)


def test_rgb_coded_input_is_drawn_in_bt601_and_tagged_so(engine, tmp_path):
    """An input coded as RGB (libx264rgb; matrix tag 0, identity) is converted to BT.601 YUV to be drawn and
    encoded, and the output says BT.601 (6): tag 0 on 4:2:0 H.264 would make players read Y, U, V as G, B, R."""
    make_video(tmp_path / "in.mkv", count=4, pix_fmt="rgb24", colorspace=0, codec="libx264rgb")
    decoder = Decoder(str(tmp_path / "in.mkv"))
    assert decoder.stream.codec_context.colorspace == 0 and decoder.colours.matrix == "bt601"
    decoder.close()
    summary = explain_video(engine, str(tmp_path / "in.mkv"), tmp_path / "out.mp4", VideoOptions(batch_size=2))
    assert summary.stopped is None and summary.frames == 4
    with av.open(str(tmp_path / "out.mp4")) as out:
        assert (out.streams.video[0].codec_context.colorspace, out.streams.video[0].codec_context.format.name) == (6, "yuv420p")


def test_a_decoding_failure_of_any_kind_keeps_the_frames_before_it(engine, tmp_path, monkeypatch):
    """An error in the decode thread that is not FFmpeg's (here a conversion failing at frame 5) ends the run
    with a message naming the frame, and the five frames before it explained, encoded and playable."""
    import wcam.video.codec as codec

    make_video(tmp_path / "in.mp4")
    real, seen = codec.planar, []

    def failing(frame, size, matrix):
        if len(seen) == 5:
            raise ValueError("unsupported pixel format")
        seen.append(frame)
        return real(frame, size, matrix)

    monkeypatch.setattr(codec, "planar", failing)
    summary = explain_video(engine, str(tmp_path / "in.mp4"), tmp_path / "out.mp4", VideoOptions(batch_size=2))
    assert summary.stopped == "cannot decode frame 5: ValueError: unsupported pixel format"
    assert summary.frames == 5 and len(decode(tmp_path / "out.mp4")[0]) == 5
