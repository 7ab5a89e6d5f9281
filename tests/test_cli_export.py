"""``wcam export`` and ``wcam explain --onnx / --backend`` (run in-process through ``main``).

Every model is resnet18 with random weights (``--weights none``) at a 32 x 32 input, so exports take seconds.
Random weights are reproduced across ``main`` calls by seeding torch right before each call: the model is
built inside ``main`` and nothing draws from torch's generator before that.
"""

import contextlib
import io
import re

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from wcam.cli import main
from wcam.export import onnx_graph
from wcam.export.decompositions import UnsupportedOpError
from wcam.export.onnx_graph import read_info

SMALL = ["resnet18", "--weights", "none", "--size", "32x32"]
TOLERANCE = 1e-3


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(argv, terminal: bool = False):
    """``main(argv)`` with torch seeded first (identical random weights on every call): (code, stdout, stderr);
    with ``terminal``, stderr says it is a terminal."""
    out, err = io.StringIO(), (_Terminal() if terminal else io.StringIO())
    torch.manual_seed(0)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {err!r}"
    assert lines[0].startswith("wcam: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_export")


@pytest.fixture(scope="module")
def image(folder):
    path = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def features(folder):
    """One ``wcam export`` of the features graph, into a folder that does not exist yet: (code, stdout, stderr, path)."""
    path = folder / "graphs" / "resnet18.onnx"
    return (*_run(["export", *SMALL, "-o", str(path)]), path)


@pytest.fixture(scope="module")
def full(folder):
    path = folder / "resnet18-full.onnx"
    return (*_run(["export", *SMALL, "--graph", "full", "-o", str(path)], terminal=True), path)


@pytest.fixture(scope="module")
def eager(folder, image):
    """The reference: ``wcam explain --model resnet18 --weights none --size 32x32 --npy`` (eager torch)."""
    out = folder / "eager"
    code, stdout, err = _run(["explain", "--model", *SMALL, "--npy", "--out", str(out), str(image)])
    assert code == 0, err
    return stdout, np.load(out / "photo_wcam.npy")


def _result_line(stdout: str) -> str:
    """The per-image line without its output paths (the class and probability)."""
    return stdout.strip().splitlines()[1].split(" -> ")[0]


# ------------------------------------------------------------------ export


def test_export_prints_one_summary_line_and_writes_a_features_graph(features):
    code, stdout, err, path = features
    assert code == 0, err
    assert err == ""  # the exporter's warnings and log chatter are silenced without -v
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    line = lines[0]
    info = read_info(path)
    assert info.graph == "features" and info.input_size == (32, 32) and len(info.layers) == 20
    assert "features" in line and "20 layers" in line and "32x32" in line and str(path) in line
    megabytes = float(re.search(r"\(([\d.]+) MB\)", line)[1])
    assert megabytes == pytest.approx(path.stat().st_size / 1e6, abs=0.05)
    assert re.search(r"in [\d.]+ s$", line)
    assert sorted(p.name for p in path.parent.iterdir()) == ["resnet18.onnx"]  # no scratch folder left behind


def test_export_full_graph_metadata_says_full(full):
    code, stdout, err, path = full
    assert code == 0, err
    assert read_info(path).graph == "full"
    assert "full graph" in stdout
    # on a terminal, a note while it exports, erased when it is done
    assert err == f"exporting resnet18 to {path} (10 s to a few minutes on a CPU)...\r\033[K"


# ------------------------------------------------------------------ explain --onnx


def test_explain_onnx_writes_the_overlay_and_matches_eager(features, eager, image, folder):
    out = folder / "from-onnx"
    code, stdout, err = _run(["explain", "--onnx", str(features[3]), str(image), "--npy", "--out", str(out)])
    assert code == 0, err
    header = stdout.splitlines()[0]
    assert f"onnx={features[3]}" in header and "backend=onnxruntime" in header and "model=" not in header
    assert "layers=20" in header and "size=32x32" in header
    assert np.asarray(Image.open(out / "photo_wcam.png")).shape == (40, 56, 3)
    heat = np.load(out / "photo_wcam.npy")
    eager_stdout, eager_heat = eager
    assert "model=resnet18 backend=eager" in eager_stdout.splitlines()[0]
    # same random weights in both processes' models: same prediction, same heatmap
    assert _result_line(stdout) == _result_line(eager_stdout)
    assert heat.shape == eager_heat.shape == (40, 56)
    assert np.abs(heat - eager_heat).max() < TOLERANCE


@pytest.fixture(scope="module")
def foreign(folder):
    """A valid ONNX graph that wcam did not write (no metadata)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = folder / "foreign.onnx"
    onnx.save_model(onnx.helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "code", "named"),
    [
        ("missing", 1, ["no such ONNX file", "missing.onnx"]),
        ("garbage", 1, ["garbage.onnx", "not a readable ONNX graph"]),
        ("foreign", 1, ["foreign.onnx", "not one exported by wcam"]),
        ("full", 1, ["resnet18-full.onnx", "'full' graph", "'features'"]),
        ("with-model", 2, ["--onnx", "--model"]),
        ("with-eager-backend", 2, ["--onnx", "--backend eager"]),
    ],
)
def test_explain_onnx_errors_are_one_line_naming_the_file(kind, code, named, folder, image, full, foreign, features):
    garbage = folder / "garbage.onnx"
    garbage.write_bytes(b"\x00\xff definitely not protobuf \xff" * 8)
    file, extra = {
        "missing": (folder / "missing.onnx", []),
        "garbage": (garbage, []),
        "foreign": (foreign, []),
        "full": (full[3], []),
        "with-model": (features[3], ["--model", "resnet18"]),
        "with-eager-backend": (features[3], ["--backend", "eager"]),
    }[kind]
    result, stdout, err = _run(["explain", "--onnx", str(file), *extra, str(image), "--out", str(folder / "unused")])
    assert result == code
    line = _one_error_line(err)
    for word in named:
        assert word in line
    assert stdout == ""


# ------------------------------------------------------------------ explain --backend


def test_backend_onnxruntime_exports_once_into_cache_dir(folder, image, eager):
    cache = folder / "cache"
    heats = []
    for run in range(2):
        out = folder / f"ort-{run}"
        backend = ["--backend", "onnxruntime", "--cache-dir", str(cache)]
        code, stdout, err = _run(["explain", "--model", *SMALL, *backend, "--npy", "--out", str(out), str(image)])
        assert code == 0, err
        assert err == ""
        assert "model=resnet18 backend=onnxruntime" in stdout.splitlines()[0]
        assert np.asarray(Image.open(out / "photo_wcam.png")).shape == (40, 56, 3)
        heats.append(np.load(out / "photo_wcam.npy"))
        cached = sorted(cache.glob("*.onnx"))
        assert len(cached) == 1  # the second start reuses the first start's graph
        if run == 0:
            first_written = cached[0].stat().st_mtime_ns
    assert cached[0].stat().st_mtime_ns == first_written
    for heat in heats:
        assert np.abs(heat - eager[1]).max() < TOLERANCE


def test_unknown_backend_is_a_usage_error(image, folder):
    code, stdout, err = _run(["explain", "--backend", "tensorrt", str(image), "--out", str(folder / "unused")])
    assert code == 2
    assert "--backend" in _one_error_line(err) and stdout == ""


# ------------------------------------------------------------------ export errors


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["resnet5000", "--weights", "none"], 2, ["unknown model", "resnet5000"]),
        (["resnet18", "--weights", "IMAGENET9K"], 2, ["unknown weights", "IMAGENET9K"]),
        (["resnet18", "--weights", "none", "--size", "abc"], 2, ["--size", "abc"]),
        (["resnet18", "--weights", "none", "--size", "0x32"], 2, ["--size", "0x32"]),
        ([*SMALL, "--layers", "layer4.9.conv1"], 2, ["unknown layer", "layer4.9.conv1"]),
        ([*SMALL, "--graph", "heatmaps"], 2, ["--graph", "heatmaps"]),
    ],
    ids=["unknown-model", "unknown-weights", "bad-size", "zero-size", "unknown-layer", "bad-graph"],
)
def test_export_usage_errors_are_one_line(args, code, named, tmp_path):
    output = tmp_path / "out.onnx"
    result, stdout, err = _run(["export", *args, "-o", str(output)])
    assert result == code
    line = _one_error_line(err)
    for word in named:
        assert word in line
    assert stdout == "" and not output.exists()


def test_export_to_an_unwritable_path_is_a_runtime_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for output in (blocker / "x.onnx", tmp_path):  # under a regular file; a folder itself
        code, stdout, err = _run(["export", *SMALL, "-o", str(output)])
        assert code == 1
        line = _one_error_line(err)
        assert "cannot write" in line and str(output) in line
        assert stdout == ""


def test_export_unsupported_op_is_one_line_naming_it(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise UnsupportedOpError("convolution_backward", "only input gradients of 2-D convolutions", ["up.0"])

    monkeypatch.setattr(onnx_graph, "export_onnx", refuse)
    output = tmp_path / "out.onnx"
    code, stdout, err = _run(["export", *SMALL, "-o", str(output)])
    assert code == 1
    line = _one_error_line(err)
    assert "resnet18" in line and "cannot export convolution_backward (in up.0)" in line
    assert stdout == "" and list(tmp_path.iterdir()) == []  # no file, no scratch folder


def test_export_help_exits_zero(capsys):
    assert main(["export", "--help"]) == 0
    assert "--graph" in capsys.readouterr().out
