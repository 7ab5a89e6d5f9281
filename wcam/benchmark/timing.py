"""Interleaved timing: every round times every entry once, in a rotated order, so that the drift and noise
of a shared machine hit all entries alike; ratios are taken round by round."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock time covers it (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (averaged over ``inner`` back-to-back calls, for very short work),
    including the device work it queued."""
    synchronise(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronise(device)
    return (time.perf_counter() - start) / inner


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device,
    on_round: Callable[[], None] | None = None,
    inner: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` times, after ``warmup`` untimed rounds; round ``r``
    starts at entry ``r`` of the rotation."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        if on_round:
            on_round()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(fns[name], device, inner))
        if on_round:
            on_round()
    return times


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


@dataclass(frozen=True)
class Summary:
    """Median seconds per call and its interquartile range; the median of per-round ratios to a reference and
    their interquartile range (how far the rounds disagree on the ratio)."""

    median: float
    q1: float
    q3: float
    ratio: float
    ratio_q1: float
    ratio_q3: float

    @classmethod
    def of(cls, times: list[float], reference: list[float]) -> "Summary":
        ratios = [t / r for t, r in zip(times, reference)]
        return cls(statistics.median(times), *_quartiles(times), statistics.median(ratios), *_quartiles(ratios))
