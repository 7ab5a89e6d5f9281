"""Evaluating explanations on datasets (``wcam eval``): datasets with ground-truth masks, a runner that
explains and scores every image with :mod:`wcam.metrics`, and the CSV and summary table."""

from wcam.eval.datasets import VOC_CLASSES, Dataset, DatasetError, Sample, demo, folder, voc2012
from wcam.eval.report import Summary, format_table, summarise, t_interval, write_csv
from wcam.eval.runner import (
    CONVENTIONAL_GRADCAM_LAYERS,
    METRICS,
    EvalError,
    EvalOptions,
    Method,
    check_options,
    evaluate,
    methods_for,
    random_heatmaps,
    score,
)

__all__ = [
    "CONVENTIONAL_GRADCAM_LAYERS",
    "METRICS",
    "VOC_CLASSES",
    "Dataset",
    "DatasetError",
    "EvalError",
    "EvalOptions",
    "Method",
    "Sample",
    "Summary",
    "check_options",
    "demo",
    "evaluate",
    "folder",
    "format_table",
    "methods_for",
    "random_heatmaps",
    "score",
    "summarise",
    "t_interval",
    "voc2012",
    "write_csv",
]
