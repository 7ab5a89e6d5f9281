"""The ``wcam`` command line (run in-process through ``main``) and the overlay helpers it draws with."""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from wcam.cli import main
from wcam.overlay import TURBO_LUT, colorize, overlay


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {err!r}"
    assert lines[0].startswith("wcam: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One ``wcam explain --demo`` run shared by the demo tests: (exit code, stdout, output folder)."""
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["explain", "--demo", "--out", str(out)])
    return code, stdout.getvalue(), out


# ------------------------------------------------------------------ explain


def test_demo_writes_overlays_at_the_photos_original_sizes(demo_run):
    code, _, out = demo_run
    assert code == 0
    for name, photo in (("chelsea", data.chelsea()), ("coffee", data.coffee())):
        written = np.asarray(Image.open(out / f"{name}_wcam.png"))
        assert written.shape == photo.shape  # chelsea: 300 x 451 x 3
        assert written.dtype == np.uint8
        assert not np.array_equal(written, photo)  # the heatmap is drawn over it
    assert sorted(p.name for p in out.iterdir()) == ["chelsea_wcam.png", "coffee_wcam.png"]


def test_demo_prints_a_header_and_one_line_per_image(demo_run):
    _, stdout, out = demo_run
    lines = stdout.strip().splitlines()
    assert len(lines) == 3
    assert "method=winsor" in lines[0] and "p=90" in lines[0] and "model=efficientnet_lite0" in lines[0]
    chelsea = next(line for line in lines if "chelsea" in line)
    assert "Egyptian cat" in chelsea
    assert str(out / "chelsea_wcam.png") in chelsea
    assert "%" in chelsea  # the top-1 probability


def test_explain_files_with_npy_and_duplicate_stems(tmp_path, capsys):
    photo = data.chelsea()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    Image.fromarray(photo[40:237, 60:391]).save(first)  # 197 x 331
    Image.fromarray(photo[::2, ::3]).save(second)  # 150 x 151
    out = tmp_path / "out"

    code = main(["explain", str(first), str(second), "--npy", "--batch-size", "1", "--out", str(out)])

    assert code == 0
    stdout = capsys.readouterr().out
    assert len(stdout.strip().splitlines()) == 3
    for stem, source in (("x", first), ("x_2", second)):
        size = np.asarray(Image.open(source)).shape[:2]
        assert np.asarray(Image.open(out / f"{stem}_wcam.png")).shape == (*size, 3)
        heat = np.load(out / f"{stem}_wcam.npy")
        assert heat.shape == size
        assert heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        assert heat.max() == pytest.approx(1.0) and heat.min() == pytest.approx(0.0)
        assert str(source) in stdout


@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(os.urandom(64) + b"not an image at all")
    return path


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["{tmp}/missing.jpg"], 1, ["no such file", "missing.jpg"]),
        (["{garbage}"], 1, ["cannot read image", "garbage.jpg"]),
        (["--demo", "--model", "resnet5000"], 2, ["unknown model", "resnet5000"]),
        (["--demo", "--layers", "no_such_layer"], 2, ["unknown layer", "no_such_layer"]),
        (["--demo", "--p", "101"], 2, ["--p", "101"]),
        (["--demo", "--alpha", "1.5"], 2, ["--alpha", "1.5"]),
        (["--demo", "--method", "gradcam", "--layers", "a", "b"], 2, ["gradcam", "one layer"]),
        ([], 2, ["no images"]),
        (["--layers", "_conv_head", "{garbage}"], 2, ["no images", "garbage.jpg' was read as a layer name"]),
    ],
    ids=["missing-file", "garbage-file", "unknown-model", "unknown-layer", "bad-p", "bad-alpha", "gradcam-layers", "no-images",
         "image-after-layers"],
)
def test_errors_are_one_line_with_an_exit_code(args, code, named, tmp_path, garbage, capsys):
    argv = ["explain", *(a.format(tmp=tmp_path, garbage=garbage) for a in args), "--out", str(tmp_path / "out")]
    assert main(argv) == code
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    for word in named:
        assert word in line
    assert captured.out == ""


def test_random_weights_are_said_in_the_header(tmp_path, capsys):
    assert main(["explain", "--demo", "--model", "resnet18", "--weights", "none", "--out", str(tmp_path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "model=resnet18 backend=eager" in header and header.endswith("; random weights: the classes mean nothing")


def test_a_weights_file_with_nan_is_one_line(tmp_path, capsys):
    torch.save({"conv1.weight": torch.full((64, 3, 7, 7), float("nan"))}, tmp_path / "nan.pt")
    argv = ["explain", "--demo", "--model", "resnet18", "--weights", str(tmp_path / "nan.pt"), "--out", str(tmp_path)]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "NaN or Inf" in line and "nan.pt" in line


def test_no_subcommand_is_a_usage_error(capsys):
    assert main([]) == 2
    _one_error_line(capsys.readouterr().err)


def test_help_exits_zero(capsys):
    assert main(["explain", "--help"]) == 0
    assert "--batch-size" in capsys.readouterr().out


def test_python_dash_m_wcam(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "wcam", "explain", str(tmp_path / "nope.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "nope.png" in _one_error_line(result.stderr)


# ------------------------------------------------------------------ overlay


def test_colorize_shape_dtype_and_endpoints():
    heat = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    colours = colorize(heat)
    assert colours.shape == (3, 4, 3) and colours.dtype == np.uint8
    assert not np.array_equal(colours[0, 0], colours[-1, -1])
    assert np.array_equal(colours[0, 0], TURBO_LUT[0]) and np.array_equal(colours[-1, -1], TURBO_LUT[255])
    assert TURBO_LUT.shape == (256, 3) and TURBO_LUT.dtype == np.uint8
    low, cool, high = TURBO_LUT[0].astype(int), TURBO_LUT[32].astype(int), TURBO_LUT[255].astype(int)
    assert low.sum() < 150 and cool[2] > cool[0] and high[0] > 2 * high[2]  # dark, then blue ... then red


def test_colorize_accepts_tensors_and_clips():
    heat = torch.tensor([[-1.0, 0.0], [1.0, 2.0], [float("nan"), 0.5]])
    colours = colorize(heat)
    assert colours.shape == (3, 2, 3)
    assert np.array_equal(colours[0, 0], TURBO_LUT[0]) and np.array_equal(colours[1, 1], TURBO_LUT[255])
    assert np.array_equal(colours[2, 0], TURBO_LUT[0])


def test_overlay_alpha_endpoints():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    heat = rng.random((5, 7))
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    assert np.array_equal(overlay(image, heat, alpha=1.0), colorize(heat))
    half = overlay(image, heat, alpha=0.5)
    assert half.shape == image.shape and half.dtype == np.uint8
    expected = np.rint((image.astype(np.float64) + colorize(heat)) / 2)
    assert np.abs(half.astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize(
    ("image", "heat", "alpha", "message"),
    [
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 6)), 0.5, "does not match"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5, 1)), 0.5, "2-D"),
        (np.zeros((4, 5), np.uint8), np.zeros((4, 5)), 0.5, "H x W x 3"),
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5)), 0.5, "uint8"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5)), 1.5, "alpha"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5)), -0.1, "alpha"),
    ],
)
def test_overlay_rejects_bad_input(image, heat, alpha, message):
    with pytest.raises(ValueError, match=message):
        overlay(image, heat, alpha)
