"""The compiled backend (torch.compile of the joint forward + activation-gradient graph) against eager.

Compiling costs ~30-70 s per (layer set, input size, dtype, batch bucket) on the 2-core CI machine, so CI
compiles one model, resnet18 at a small input, for Winsor-CAM (the other methods go through the same runner):
once for batches of 4 (serving 3, padded, and 4) and once at batch 1. Tolerance 1e-3 max abs on normalised
heatmaps: Inductor reorders float32
arithmetic, so where a ReLU input is within rounding of 0 an early-layer gradient element can flip
(measured on resnet18 at 224 by the environment notes: CAM maps differ by up to 2e-3); measured here ~1e-6.
"""

from __future__ import annotations

import torch

from wcam import Engine, Preprocess


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
