"""The pytest-benchmark suite runs with glibc malloc tuned as ``wcam bench`` runs it (:func:`wcam.tune_malloc`)."""

import warnings

import pytest

import wcam


def pytest_configure(config: pytest.Config) -> None:
    if not wcam.tune_malloc():
        warnings.warn("glibc malloc could not be tuned: these timings are with malloc as configured", stacklevel=1)
