"""The CAM maths, batched over images and layers.

Three steps, here as vectorised torch; :mod:`wcam.kernels.triton` has fused Triton twins of each, and
:mod:`wcam.kernels.dispatch` chooses between them:

- :func:`layer_maps`: per-layer Grad-CAM maps at native resolution, min-max normalised, and layer scores
  (spec steps 3-6); it is :func:`channel_cam` per layer followed by :func:`group_maps`; a runner may
  take each layer's :func:`channel_weights` as its gradient appears during the backward (while it is still in
  cache) and the :func:`weighted_channels` sums after it;
- :func:`winsor_weights`: the per-image quantile clamp of the layer scores and the [0.1, 1] weights
  (spec steps 7-8);
- :func:`weighted_sum`: every layer map resampled and summed with its weight, first at the largest layer
  size, then once to the output size (spec step 9); :func:`normalize_maps` is the final min-max (step 10).
"""

from wcam.kernels.layer_maps import (
    LayerMaps,
    channel_cam,
    channel_weights,
    group_maps,
    layer_maps,
    weighted_channels,
)
from wcam.kernels.resample import normalize_maps, resample, weighted_sum
from wcam.kernels.winsor import check_percentile, winsor_weights

__all__ = [
    "LayerMaps",
    "channel_cam",
    "channel_weights",
    "check_percentile",
    "group_maps",
    "layer_maps",
    "normalize_maps",
    "resample",
    "weighted_channels",
    "weighted_sum",
    "winsor_weights",
]
