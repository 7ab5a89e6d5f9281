"""Evaluation output: the per-image CSV and the summary table (mean and 95% interval per method).

The interval is Student's t-interval for the mean, ``mean +- t(0.975, n - 1) * s / sqrt(n)`` with ``s`` the
sample standard deviation (ddof 1) over the ``n`` images whose value is defined (NaN values, e.g. a
centre-of-mass distance to an empty mask, are left out and ``n`` says how many remain); none for ``n < 2``.
It describes the spread of the images' values, not a test between methods: those are paired on the same
images, which the per-image CSV lets one compare directly.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from wcam.eval.runner import HIGHER_IS_BETTER

FIXED_COLUMNS = ("image", "method", "target", "class", "probability")


@dataclass(frozen=True)
class Summary:
    """One method's mean and t-interval half-width per metric (NaN where undefined), and the image counts."""

    method: str
    count: dict[str, int]
    mean: dict[str, float]
    half_width: dict[str, float]


def write_csv(rows: Sequence[dict[str, object]], path: str | Path, metrics: Sequence[str]) -> None:
    """One line per (image, method): the fixed columns, then one column per metric (``nan`` where undefined)."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=[*FIXED_COLUMNS, *metrics])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def t_interval(values: Sequence[float]) -> tuple[int, float, float]:
    """``(n, mean, half-width)`` of the 95% t-interval over the finite values; NaN mean for none, NaN
    half-width for fewer than two."""
    from scipy.special import stdtrit  # Student's t quantile; scipy comes with scikit-image

    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = finite.size
    if n == 0:
        return 0, math.nan, math.nan
    if n == 1:
        return 1, float(finite[0]), math.nan
    return n, float(finite.mean()), float(stdtrit(n - 1, 0.975) * finite.std(ddof=1) / math.sqrt(n))


def summarise(rows: Sequence[dict[str, object]], metrics: Sequence[str]) -> list[Summary]:
    """Per method (in the rows' order): the mean and 95% t-interval of every metric over its images."""
    by_method: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_method.setdefault(str(row["method"]), []).append(row)
    summaries = []
    for method, group in by_method.items():
        stats = {metric: t_interval([float(r[metric]) for r in group]) for metric in metrics}  # type: ignore[arg-type]
        summaries.append(
            Summary(
                method=method,
                count={m: s[0] for m, s in stats.items()},
                mean={m: s[1] for m, s in stats.items()},
                half_width={m: s[2] for m, s in stats.items()},
            )
        )
    return summaries


def _cell(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} +- {half:.3f}"


def format_table(summaries: Sequence[Summary], metrics: Sequence[str]) -> str:
    """The summary as an aligned ASCII table: one column per method, a line with its image count ``n``, then one
    line per metric with ``mean +- half-width``, and a legend saying which metrics are better lower."""
    header = ["metric", *(s.method for s in summaries)]
    counts = ["n", *(str(max(s.count.values(), default=0)) for s in summaries)]
    lines = [[m, *(_cell(s.mean[m], s.half_width[m]) for s in summaries)] for m in metrics]
    table = [header, counts, *lines]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in table
    ]
    fewer = [m for m in metrics if any(s.count[m] < max(s.count.values()) for s in summaries)]
    lower = [m for m in metrics if not HIGHER_IS_BETTER[m]]
    legend = "mean +- half-width of the 95% t-interval over n images; " + (
        f"lower is better for {', '.join(lower)}, higher for the rest" if lower else "higher is better"
    )
    if fewer:
        legend += f"; {', '.join(fewer)}: images with an undefined value left out"
    return "\n".join([*text, legend])
