"""pytest-benchmark suite of ``wcam bench``'s cases: the floor, wcam and the peers, per model and batch.

Run: ``pytest bench/test_bench_peers.py --benchmark-group-by=param:name,param:batch`` (needs the ``bench``
extra). Each case's entries are built and checked once (as ``wcam bench`` does); for ratios measured
interleaved round by round, robust to a noisy machine, use ``wcam bench``.
"""

from __future__ import annotations

import pytest
import torch

from wcam.benchmark.cases import ModelBench
from wcam.benchmark.command import MODELS
from wcam.benchmark.peers import PEERS

BATCHES = [1, 8]


@pytest.fixture(scope="module")
def cases():
    made: dict = {}

    def get(name: str, batch: int) -> dict:
        if (name, batch) not in made:
            bench = ModelBench(name, ["eager"], torch.device("cpu"), "DEFAULT" if name == "efficientnet_lite0" else None)
            made[name, batch] = {e.label: e for e in bench.case(batch).entries}
        return made[name, batch]

    return get


ENTRIES = [
    "floor: forward + activation gradients",
    "floor, NCHW input",
    "wcam winsor p=90, eager",
    "wcam gradcam (last conv), eager",
    "wcam with_p: new p on cached maps",
    *[peer.label for peer in PEERS],
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_bench(benchmark, cases, name, batch, entry):
    benchmark.extra_info["images_per_call"] = batch
    benchmark.pedantic(cases(name, batch)[entry].run, rounds=5, warmup_rounds=1)
