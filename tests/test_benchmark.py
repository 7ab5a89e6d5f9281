"""``wcam bench``: the peer adapters compute what they claim (the same Grad-CAM as wcam's), the checks
reject broken outputs, the timing interleaves, and the command writes a complete table and JSON."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
import torch

from helpers import hook_counts
from wcam import Engine
from wcam.benchmark.cases import BenchError, _check_heatmaps, photos
from wcam.benchmark.peers import PEERS
from wcam.benchmark.report import Row, target_lines, targets
from wcam.benchmark.timing import Summary, interleaved
from wcam.cli import main

# The last-conv peers and wcam's gradcam compute the same float32 formula (mean gradient, weighted channel
# sum, ReLU, min-max, bilinear half-pixel resize, min-max) in a different order of operations; on values in
# [0, 1] that leaves differences of a few float32 ulps amplified by the normalisation (measured <= 1.1e-6).
GRADCAM_TOL = 1e-5


@pytest.fixture(scope="module")
def lite0_engine(lite0):
    return Engine(lite0.model, preprocess=lite0.preprocess)


@pytest.mark.parametrize("peer", [p for p in PEERS if p.same_as == "gradcam"], ids=lambda p: p.package)
def test_last_conv_peers_equal_wcam_gradcam(lite0_engine, peer):
    """Three independent libraries agree with wcam's single-layer Grad-CAM on the pretrained Lite0 and real
    photos; their hooks are gone after each call."""
    engine = lite0_engine
    images = photos(2, engine)
    expected = engine.explain(images, method="gradcam").heatmaps
    before = hook_counts(engine.model)
    got = peer.build(engine.model, engine.layers, engine.gradcam_layer, images)()
    assert hook_counts(engine.model) == before
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= GRADCAM_TOL


def test_all_layer_peer_is_checked_and_leaves_no_hooks(seeded_models):
    model = seeded_models("resnet18")
    engine = Engine(model)
    images = photos(2, engine)
    peer = next(p for p in PEERS if p.same_as == "layer_mean")
    before = hook_counts(model)
    maps = _check_heatmaps(peer.label, peer.build(model, engine.layers, engine.gradcam_layer, images)(), (2, 224, 224))
    assert hook_counts(model) == before
    # pytorch-grad-cam averages per-layer maps that it normalises after resizing, wcam's layer_mean before:
    # close, not equal.
    assert (maps - engine.explain(images, method="layer_mean").heatmaps).abs().mean().item() < 0.05


def _with_nan() -> torch.Tensor:
    maps = torch.rand(2, 8, 8)
    maps[0, 1, 1] = float("nan")
    return maps


@pytest.mark.parametrize(
    "maps, message",
    [
        (torch.rand(2, 8, 9), r"expected heatmaps of shape \(2, 8, 8\), got \(2, 8, 9\)"),
        (torch.rand(2, 64), "expected heatmaps of shape"),
        (torch.stack([torch.rand(8, 8), torch.full((8, 8), 0.5)]), "image 1 is constant"),
        (_with_nan(), "NaN"),
        ([[0.0]], "got list"),
    ],
)
def test_check_rejects_broken_outputs(maps, message):
    with pytest.raises(BenchError, match=message):
        _check_heatmaps("peer", maps, (2, 8, 8))
    assert _check_heatmaps("peer", torch.rand(2, 8, 8), (2, 8, 8)).shape == (2, 8, 8)


def test_interleaved_rotates_the_order():
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved(fns, rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_summary_of_rounds():
    s = Summary.of([4.0, 1.0, 3.0, 2.0, 5.0], reference=[2.0, 1.0, 1.0, 1.0, 5.0])
    # median 3; inclusive quartiles of 1..5: 2 and 4; per-round ratios 2, 1, 3, 2, 1 -> median 2
    assert (s.median, s.q1, s.q3, s.ratio) == (3.0, 2.0, 4.0, 2.0)


def test_bench_command_writes_every_entry(tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"  # a folder that does not exist yet
    code = main(["bench", "--models", "resnet18", "--batches", "2", "--rounds", "2", "--warmup", "0",
                 "--backends", "eager", "--size", "64x96", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    labels = [row["label"] for row in result["rows"]]
    assert labels == [
        "floor: forward + activation gradients",
        "floor, NCHW input",  # the floor above gets the engine's channels-last CPU input
        "floor, batch norms folded (the network of wcam eager, batch norms folded)",  # resnet18: 20 folded
        "wcam winsor p=90, eager",
        "wcam winsor p=90, eager, batch norms folded",
        "wcam gradcam (last conv), eager",
        "wcam with_p: new p on cached maps",
        *[peer.label for peer in PEERS],
    ]
    for row in result["rows"]:
        assert len(row["seconds"]) == 2 and min(row["seconds"]) > 0
        assert row["label"] in printed
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"wcam", "grad-cam", "with_p"}
    overhead = [t for t in result["targets"] if t["target"].startswith("(no target)")]
    assert len(overhead) == 1 and overhead[0]["met"] is None and overhead[0]["value"] > 0
    assert result["settings"]["size"] == [64, 96]
    assert result["settings"]["malloc"] == "wcam.tune_malloc"  # the command line's default, recorded
    assert result["machine"]["cores"] >= 1 and result["versions"]["torch"] == torch.__version__
    assert result["complete"] is True


def test_a_bench_cut_short_keeps_the_cases_it_timed(tmp_path, monkeypatch, capsys):
    """The JSON is rewritten after each case: a run stopped at its second batch size (a time limit, an error)
    leaves the first one's rows, marked incomplete."""
    from wcam.benchmark.cases import ModelBench

    timed_case = ModelBench.case

    def case(self, batch, *args, **kwargs):
        if batch == 2:
            raise RuntimeError("stopped")
        return timed_case(self, batch, *args, **kwargs)

    monkeypatch.setattr(ModelBench, "case", case)
    out = tmp_path / "bench.json"
    code = main(["bench", "--models", "resnet18", "--batches", "1", "2", "--rounds", "1", "--warmup", "0",
                 "--backends", "eager", "--peers", "--size", "32x32", "--json", str(out)])
    assert code != 0 and "stopped" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["complete"] is False and {row["batch"] for row in result["rows"]} == {1}
    assert any(row["label"] == "wcam winsor p=90, eager" for row in result["rows"])


def test_default_backends_compile_at_the_target_batch_only(monkeypatch):
    """Compiling costs minutes per model and batch size on 2 cores: by default the compiled backend is timed
    at the batch the targets are read at (8 when timed, else the largest) and the others everywhere; backends
    given explicitly are timed at every batch."""
    from wcam.benchmark.command import _backends

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # onnxruntime "installed"
    built, timed, notes = _backends(None, [1, 8])
    assert built == ["eager", "onnxruntime", "compiled"] and notes == []
    assert timed == {1: ["eager", "onnxruntime"], 8: ["eager", "onnxruntime", "compiled"]}
    assert _backends(None, [1, 8, 32])[1][8] == built and "compiled" not in _backends(None, [1, 8, 32])[1][32]
    assert _backends(None, [1, 4])[1][4] == built
    built, timed, notes = _backends(["compiled"], [1, 8])
    assert built == ["eager", "compiled"] and timed == {1: built, 8: built} and notes == []


def test_default_backends_on_a_gpu_leave_out_onnx_runtime_without_its_cuda_provider(monkeypatch):
    """On a GPU, ONNX Runtime without its CUDA provider would time the CPU: not by default, and said so."""
    import onnxruntime

    from wcam.benchmark.command import _backends

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    built, timed, notes = _backends(None, [1, 8], "cuda")
    assert built == ["eager", "compiled"] and timed[1] == ["eager"]
    assert len(notes) == 1 and "no CUDA provider" in notes[0] and "--backends onnxruntime" in notes[0]
    assert _backends(None, [8], "cpu")[0] == ["eager", "onnxruntime", "compiled"]  # the CPU provider is the CPU's
    assert _backends(["onnxruntime"], [8], "cuda")[0] == ["eager", "onnxruntime"]  # asked for: timed
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert _backends(None, [8], "cuda") == (["eager", "onnxruntime", "compiled"], {8: ["eager", "onnxruntime", "compiled"]}, [])


def test_a_failing_compiled_backend_is_left_out_with_a_note(monkeypatch, tmp_path):
    """Inductor needs a C++ compiler: where compiling fails the table is made without that backend, and the
    notes say why; a failure of any other backend still stops the run."""
    from wcam.benchmark.cases import ModelBench

    bench = ModelBench("resnet18", ["eager", "compiled"], torch.device("cpu"), None, tmp_path, size=(32, 32))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(bench.engines["compiled"]._runner, "run", no_compiler)
    case = bench.case(2, peers=[])
    assert not any("compiled" in entry.label for entry in case.entries)
    assert any("wcam winsor p=90, eager" == entry.label for entry in case.entries)
    assert "torch.compile failed, not timed: RuntimeError: no C++ compiler" in bench.setup
    monkeypatch.setattr(bench.engines["eager"]._runner, "run", no_compiler)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        bench.case(2, peers=[])


def test_targets_are_medians_of_per_round_ratios():
    """Where the ratio of medians and the median of per-round ratios differ, the targets take the latter, as
    the table does: a round where the machine slowed down for both entries cancels out."""

    def row(label: str, group: str, seconds: list[float]) -> Row:
        ms = statistics.median(seconds) * 1e3 / 8
        return Row("m", 8, label, group, ms, ms, ms, 8 / ms, 1.0, 1.0, "", seconds)

    found = [
        row("floor: forward + activation gradients", "floor", [1.0, 1.0, 1.0]),
        row("wcam winsor p=90, eager", "wcam", [1.0, 2.0, 4.0]),
        row("wcam gradcam (last conv), eager", "wcam", [1.0, 2.0, 4.0]),
        row("wcam with_p: new p on cached maps", "wcam", [0.001, 0.001, 0.001]),
        row("grad-cam GradCAM, all conv layers", "peer", [3.0, 3.0, 9.0]),
        row("torchcam GradCAM, last conv", "peer", [0.5, 3.0, 3.0]),
    ]
    found_targets = {t["target"].split(" (")[0]: t for t in targets(found)}
    got = {name: t["value"] for name, t in found_targets.items()}
    assert got["grad-cam all layers"] == pytest.approx(2.25)  # rounds 3, 1.5, 2.25; medians' ratio 1.5
    assert got["wcam gradcam / fastest peer"] == pytest.approx(4 / 3)  # rounds 2, 2/3, 4/3; medians' 2/3
    # the rounds' interquartile range (inclusive quartiles of 3 values: the midpoints), and whether the
    # threshold lies inside it: 2 is inside [1.875, 2.625], 1 inside [1.0, 1.667]; 1.10 is not in [2, 3]
    gradcam = found_targets["wcam gradcam / fastest peer"]
    assert gradcam["spread"] == pytest.approx([1.0, 5 / 3]) and gradcam["within_noise"] and gradcam["met"] is False
    assert found_targets["grad-cam all layers"]["spread"] == pytest.approx([1.875, 2.625])
    assert found_targets["grad-cam all layers"]["within_noise"] and found_targets["grad-cam all layers"]["met"]
    eager = found_targets["wcam winsor"]
    assert eager["spread"] == pytest.approx([1.5, 3.0]) and not eager["within_noise"] and eager["met"] is False
    assert found_targets["with_p ms/image < 1"]["spread"] is None
    printed = target_lines(targets(found))
    assert "| 1.33 [1.00, 1.67] | no, within the rounds' spread |" in printed
