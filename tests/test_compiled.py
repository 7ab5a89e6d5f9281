"""The compiled backend (torch.compile of the joint forward + activation-gradient graph) against eager.

Compiling costs ~30-70 s per (layer set, input size, dtype, batch bucket) on the 2-core CI machine, so CI
compiles one model, resnet18 at a small input, for Winsor-CAM (the other methods go through the same runner):
once for batches of 4 (serving 3, padded, and 4) and once at batch 1. Tolerance 1e-3 max abs on normalised
heatmaps: Inductor reorders float32
arithmetic, so where a ReLU input is within rounding of 0 an early-layer gradient element can flip
(measured on resnet18 at 224 by the environment notes: CAM maps differ by up to 2e-3); measured here ~1e-6.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from wcam import Engine, Preprocess
from wcam.engine import compiled_runner


def test_compiled_matches_eager_and_reports_compile_time(seeded_models):
    model = seeded_models("resnet18")
    eager = Engine(model, preprocess=Preprocess(size=(32, 40)))
    compiled = Engine(model, preprocess=Preprocess(size=(32, 40)), backend="compiled")
    for size in (3, 4, 1):
        images = torch.randn(size, 3, 32, 40, generator=torch.Generator().manual_seed(size))
        want = eager.explain(images, p=70.0)
        got = compiled.explain(images, p=70.0)
        assert torch.equal(got.targets, want.targets)
        assert (got.heatmaps - want.heatmaps).abs().max().item() <= 1e-3, size
        torch.testing.assert_close(got.layer_scores, want.layer_scores, rtol=1e-3, atol=1e-9)
    targets = [5, 0, 999]
    got = compiled.explain(torch.randn(3, 3, 32, 40), targets=targets)
    assert got.targets.tolist() == targets
    seconds = compiled._runner.compile_seconds
    # one graph for batches of 3 and 4 (the bucket of 4) and one for batch 1, each timed
    assert sorted(key[-1] for key in seconds) == [1, 4] and all(s > 0 for s in seconds.values())


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_compiled_on_a_model_with_trainable_parameters():
    """A freshly built model's parameters require grad: the graph (which holds its own backward) must still
    run, agree with eager, and leave the parameters as they were (no .grad, requires_grad kept)."""
    model = _Small().train()
    preprocess = Preprocess(size=(20, 30))
    images = torch.randn(3, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    want = Engine(model, preprocess=preprocess).explain(images, targets=[4, 0, 2])
    got = Engine(model, preprocess=preprocess, backend="compiled").explain(images, targets=[4, 0, 2])
    assert not got.heatmaps.requires_grad and not got.layer_scores.requires_grad
    assert (got.heatmaps - want.heatmaps).abs().max().item() <= 1e-3
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and model.training


def test_a_graph_being_traced_does_not_hold_up_calls_on_a_compiled_one(monkeypatch):
    """One thread traces a graph for a new batch size (held here until released); another thread's call on
    the graph compiled before must finish meanwhile, not wait for the runner's lock."""
    model = _Small().eval().requires_grad_(False)
    engine = Engine(model, preprocess=Preprocess(size=(20, 30)), backend="compiled")
    one = torch.randn(1, 3, 20, 30)
    want = engine.explain(one)  # compiles the batch-1 graph
    entered, release = threading.Event(), threading.Event()

    def held_trace(*args, **kwargs):
        entered.set()
        release.wait(timeout=120)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(compiled_runner, "trace_joint", held_trace)
    failures: list[BaseException] = []

    def new_batch() -> None:
        try:
            engine.explain(torch.randn(2, 3, 20, 30))
        except RuntimeError as error:
            failures.append(error)

    tracer = threading.Thread(target=new_batch)
    tracer.start()
    try:
        assert entered.wait(timeout=120)
        results: list = []
        caller = threading.Thread(target=lambda: results.append(engine.explain(one)))
        caller.start()
        caller.join(timeout=120)
        assert results and torch.equal(results[0].heatmaps, want.heatmaps), "the call waited for the tracing"
    finally:
        release.set()
        tracer.join(timeout=120)
    assert [str(f) for f in failures] == ["stopped by the test"]


def test_at_most_max_graphs_are_kept_the_least_recently_used_dropped(monkeypatch, caplog):
    """A server whose requests choose the input size: graphs beyond the bound are dropped, least recently used
    first, and a dropped one is traced again when needed. Compilation itself is replaced by the traced graph
    (what Inductor compiles), so the test checks the cache, not Inductor."""
    monkeypatch.setattr(compiled_runner, "MAX_GRAPHS", 2)
    monkeypatch.setattr(compiled_runner.torch, "compile", lambda graph, **kwargs: graph)
    model = _Small().eval().requires_grad_(False)
    engine = Engine(model, backend="compiled")
    eager = Engine(model)
    sizes = [(20, 30), (24, 24), (20, 30), (16, 32), (24, 24)]
    for h, w in sizes:
        images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        assert (engine.explain(images).heatmaps - eager.explain(images).heatmaps).abs().max().item() <= 1e-5
    # (24, 24) was dropped when (16, 32) came ((20, 30) had been used after it), then traced again
    assert [key[1] for key in engine._runner._compiled] == [(16, 32), (24, 24)]
    assert caplog.text.count("dropped the least recently used") == 2
