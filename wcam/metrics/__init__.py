"""Metrics for heatmaps, batched (``B x H x W``) and computed on the heatmaps' device: localisation against
ground-truth masks (:mod:`wcam.metrics.localisation`) and faithfulness to the model
(:mod:`wcam.metrics.faithfulness`). Each function's docstring states its exact definition."""

from wcam.metrics.faithfulness import (
    ConfidenceChange,
    blur_kernel,
    blurred,
    confidence_change,
    curve_auc,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    pixel_order,
)
from wcam.metrics.localisation import (
    binarise,
    box_masks,
    centre_of_mass,
    centre_of_mass_distance,
    energy_in_mask,
    iou,
    mask_iou,
    otsu_threshold,
    pointing_game,
)

__all__ = [
    "ConfidenceChange",
    "binarise",
    "blur_kernel",
    "blurred",
    "box_masks",
    "centre_of_mass",
    "centre_of_mass_distance",
    "confidence_change",
    "curve_auc",
    "deletion_auc",
    "deletion_curve",
    "energy_in_mask",
    "insertion_auc",
    "insertion_curve",
    "iou",
    "mask_iou",
    "otsu_threshold",
    "pixel_order",
    "pointing_game",
]
