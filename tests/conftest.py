"""Shared fixtures: seeded random-weight models (built once per session) and the packaged real photos."""

from __future__ import annotations

import os

# The Triton kernels run through Triton's CPU interpreter in the tests (on CPU tensors; the compiled kernels
# are checked on a GPU by bench/gpu.py); it must be set before Triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from wcam.engine.models import load_model


@pytest.fixture(scope="session", autouse=True)
def _two_torch_threads():
    """Every test runs on 2 torch threads, CI's 2 cores, whatever the machine: oneDNN orders its float32 sums
    by thread count, and the float32 comparisons' inputs were chosen, at 2 threads, among those whose float32
    pass takes the float64 ReLU and max-pool branches (tests/test_reference_agreement.py): at 1 thread the
    seeded InceptionV3 inputs flip a branch (heatmaps 5.8e-4 from float64, 2.7e-3 from ONNX Runtime)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _malloc_as_configured(monkeypatch):
    """Commands run in-process (``main([...])``) leave this process's malloc as it is: tune_malloc is
    process-wide and lasting, so a test that ran one would change the rest of the session. Its own tests run
    it in child processes (``tests/test_allocator.py``)."""
    import wcam.allocator

    monkeypatch.setattr(wcam.allocator, "tune_malloc", lambda: True)


@pytest.fixture(scope="session")
def seeded_models():
    """Build a named torchvision model with seeded random weights, once per session."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = load_model(name, weights=None).model
        return cache[name]

    return get


@pytest.fixture(scope="session")
def lite0():
    """The packaged pretrained EfficientNet-Lite0 (real ImageNet weights, offline)."""
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos that ship inside scikit-image's wheel (uint8 H x W x 3)."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut()}
