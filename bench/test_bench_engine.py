"""pytest-benchmark suite: the engine and ``with_p`` against the floor (forward + activation gradients).

Run: ``pytest bench/test_bench_engine.py --benchmark-group-by=param:name,param:batch``.
Groups put floor, engine and with_p of one model and batch side by side; for ratios measured interleaved
(robust to a noisy shared machine) use ``python bench/engine_vs_floor.py``.
"""

from __future__ import annotations

import pytest
from cases import engine_fn, floor_fn, make_engine, make_images, with_p_fn

MODELS = ["resnet50", "efficientnet_lite0"]
BATCHES = [1, 8]
CASES = {"floor": floor_fn, "engine": engine_fn, "with_p": with_p_fn}


@pytest.fixture(scope="module")
def engines():
    return {name: make_engine(name) for name in MODELS}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_bench(benchmark, engines, name, batch, case):
    fn = CASES[case](engines[name], make_images(batch))
    benchmark.extra_info["images_per_call"] = batch
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
