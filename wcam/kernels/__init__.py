"""The CAM maths, batched over images and layers.

Three steps, each a function that a fused GPU kernel can later replace behind the same signature:

- :func:`layer_maps`: per-layer Grad-CAM maps at native resolution, min-max normalised, and layer scores
  (spec steps 3-6);
- :func:`winsor_weights`: the per-image quantile clamp of the layer scores and the [0.1, 1] weights
  (spec steps 7-8);
- :func:`weighted_sum`: every layer map resampled and summed with its weight, first at the largest layer
  size, then once to the output size (spec step 9); :func:`normalize_maps` is the final min-max (step 10).
"""

from wcam.kernels.layer_maps import LayerMaps, layer_maps
from wcam.kernels.resample import normalize_maps, resample, weighted_sum
from wcam.kernels.winsor import check_percentile, winsor_weights

__all__ = ["LayerMaps", "check_percentile", "layer_maps", "normalize_maps", "resample", "weighted_sum", "winsor_weights"]
