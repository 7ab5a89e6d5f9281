"""The benchmark's output: a markdown table per model and batch (ms per image, spread, images/s, ratios to
the floor and to wcam), the targets of issue 6, and the same as JSON with the machine and versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

from wcam.benchmark.cases import FOLDED_FLOOR, Case
from wcam.benchmark.timing import Summary

VERSIONS = ("wcam", "torch", "torchvision", "numpy", "onnxruntime", "triton", "grad-cam", "torchcam", "captum")


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores and torch threads, GPU name (if the run uses one), OS and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in VERSIONS:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["torch"] = torch.__version__  # with its build tag (e.g. +cu130, +cpu)
    return found


@dataclass(frozen=True)
class Row:
    model: str
    batch: int
    label: str
    group: str
    ms_per_image: float
    q1_ms: float
    q3_ms: float
    images_per_s: float
    vs_floor: float
    vs_wcam: float
    check: str
    seconds: list[float]


def rows(case: Case, times: dict[str, list[float]]) -> list[Row]:
    """One row per entry; ``vs_floor`` and ``vs_wcam`` are medians of per-round time ratios (wcam: Winsor-CAM
    on the first engine: eager, with the torch kernels on a CPU and the Triton kernels on a GPU)."""
    floor = times[case.entries[0].label]
    wcam = times[next(e.label for e in case.entries if e.group == "wcam")]
    out = []
    for entry in case.entries:
        t = times[entry.label]
        s, w = Summary.of(t, floor), Summary.of(t, wcam)
        per = 1e3 / case.batch
        out.append(Row(case.model, case.batch, entry.label, entry.group, s.median * per, s.q1 * per, s.q3 * per,
                       case.batch / s.median, s.ratio, w.ratio, entry.check, t))
    return out


def table(found: list[Row]) -> str:
    lines = [
        "| model | batch | entry | ms/image: median [IQR] | images/s | / floor | / wcam | checked |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in found:
        lines.append(
            f"| {r.model} | {r.batch} | {r.label} | {r.ms_per_image:.2f} [{r.q1_ms:.2f}, {r.q3_ms:.2f}] "
            f"| {r.images_per_s:.1f} | {r.vs_floor:.2f} | {r.vs_wcam:.2f} | {r.check} |"
        )
    return "\n".join(lines)


def targets(found: list[Row], batch: int = 8) -> list[dict[str, Any]]:
    """Issue 6's targets at ``batch``, per model: wcam's eager Winsor-CAM (the first engine) within 1.10x of the floor;
    wcam's best Winsor-CAM >= 2x faster than pytorch-grad-cam on all conv layers; wcam's gradcam at least as
    fast as the fastest peer single-layer Grad-CAM; ``with_p`` under 1 ms per image. Ratios are medians of
    per-round ratios, as in the table (the best and the fastest are chosen by median), with the interquartile
    range of those per-round ratios as ``spread``; ``within_noise`` says that the threshold lies inside it, so
    that the rounds disagree on the verdict. Where the eager engine with batch norms folded ran, one more line
    (``met`` None) gives its overhead over the floor of the folded network."""
    results = []
    for model in dict.fromkeys(r.model for r in found if r.batch == batch):
        mine = [r for r in found if r.model == model and r.batch == batch]
        floor = mine[0]
        winsor = [r for r in mine if r.label.startswith("wcam winsor")]
        best = min(winsor, key=lambda r: r.ms_per_image)
        gradcam = next(r for r in mine if r.label.startswith("wcam gradcam"))
        with_p = next(r for r in mine if r.label.startswith("wcam with_p"))
        # (target, ratio summary or a plain value, threshold, met when the value is at most the threshold)
        checks: list[tuple[str, Summary | float, float | None, bool]] = [
            (f"wcam winsor ({winsor[0].label.split(', ', 1)[1]}) / floor <= 1.10",
             Summary.of(winsor[0].seconds, floor.seconds), 1.10, True)
        ]
        folded_floor = next((r for r in mine if r.label == FOLDED_FLOOR), None)
        folded = next((r for r in winsor if r.label.endswith("batch norms folded")), None)
        if folded_floor is not None and folded is not None:  # not a target: its overhead over its own network
            checks.append(("(no target) wcam winsor (eager, batch norms folded) / its floor",
                           Summary.of(folded.seconds, folded_floor.seconds), None, True))
        for peer in [r for r in mine if r.label.startswith("grad-cam GradCAM, all conv layers")]:
            which = peer.label.removeprefix("grad-cam GradCAM, all conv layers").strip(", ") or "frozen model"
            checks.append((f"grad-cam all layers ({which}) / wcam best ({best.label.split(', ', 1)[1]}) >= 2",
                           Summary.of(peer.seconds, best.seconds), 2.0, False))
        singles = [r for r in mine if r.group == "peer" and "last conv" in r.label]
        if singles:
            fastest = min(singles, key=lambda r: r.ms_per_image)
            checks.append((f"wcam gradcam / fastest peer ({fastest.label}) <= 1",
                           Summary.of(gradcam.seconds, fastest.seconds), 1.0, True))
        checks.append(("with_p ms/image < 1", with_p.ms_per_image, 1.0, True))
        for target, value, threshold, at_most in checks:
            line: dict[str, Any] = {"model": model, "batch": batch, "target": target}
            if isinstance(value, Summary):
                line["value"], line["spread"] = value.ratio, [value.ratio_q1, value.ratio_q3]
                line["within_noise"] = threshold is not None and value.ratio_q1 <= threshold <= value.ratio_q3
            else:
                line["value"], line["spread"], line["within_noise"] = value, None, False
            met = None if threshold is None else line["value"] <= threshold if at_most else line["value"] >= threshold
            results.append({**line, "met": met})
    return results


def target_lines(met: list[dict[str, Any]]) -> str:
    """The targets as a markdown table: value [spread of the rounds], and whether met ("yes, within the
    rounds' spread" where the rounds disagree)."""
    lines = ["| model | batch | target | value [IQR of the rounds] | met |", "| --- | --- | --- | --- | --- |"]
    for t in met:
        spread = f" [{t['spread'][0]:.2f}, {t['spread'][1]:.2f}]" if t["spread"] else ""
        verdict = "-" if t["met"] is None else "yes" if t["met"] else "no"
        if t["within_noise"]:
            verdict += ", within the rounds' spread"
        lines.append(f"| {t['model']} | {t['batch']} | {t['target']} | {t['value']:.2f}{spread} | {verdict} |")
    return "\n".join(lines)


def as_json(
    found: list[Row], met: list[dict[str, Any]], device: torch.device, notes: list[str], settings: dict[str, Any]
) -> dict[str, Any]:
    return {
        "machine": machine(device),
        "versions": versions(),
        "settings": settings,
        "notes": notes,
        "rows": [asdict(r) for r in found],
        "targets": met,
    }
