"""The pytest-benchmark suite runs with glibc malloc tuned as ``wcam bench`` runs it (:func:`wcam.tune_malloc`)."""

import wcam


def pytest_configure(config) -> None:
    wcam.tune_malloc()
