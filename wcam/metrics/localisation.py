"""Localisation metrics: how well a heatmap covers the annotated object (IoU, centre of mass, pointing
game, energy inside the object).

Every function takes a batch: heatmaps ``B x H x W`` (any floating dtype; min-max normalised heatmaps in
[0, 1] are what :class:`wcam.Explanation` gives) and ground-truth masks ``B x H x W`` of dtype bool at the
same size, on the same device, and returns one value per image (a ``B`` tensor on that device, in the
heatmaps' dtype promoted to at least float32). Pixel ``(i, j)`` (row, column) has its centre at ``(i, j)``.
Batched results equal per-image results: nothing is shared between the images of a batch.

Degenerate inputs have stated values rather than NaN wherever a value makes sense: a heatmap that is all
zeros carries no information and is scored as a constant heatmap (the uniform map it is the limit of),
an empty mask gives IoU, pointing and energy 0 and a centre-of-mass distance of NaN (no object, no
centre), which averages skip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_heatmaps(heatmaps: Tensor, nonnegative: bool = False) -> Tensor:
    """Validate a ``B x H x W`` floating heatmap batch (finite, and >= 0 when ``nonnegative``)."""
    if not isinstance(heatmaps, Tensor):
        raise ValueError(f"heatmaps must be a torch.Tensor, got {type(heatmaps).__name__}")
    if heatmaps.dim() != 3 or 0 in heatmaps.shape:
        raise ValueError(f"heatmaps must be a non-empty B x H x W tensor, got shape {tuple(heatmaps.shape)}")
    if not heatmaps.dtype.is_floating_point:
        raise ValueError(f"heatmaps must be floating point, got {heatmaps.dtype}")
    if not bool(torch.isfinite(heatmaps).all()):
        raise ValueError("heatmaps contain NaN or Inf values")
    if nonnegative and bool((heatmaps < 0).any()):
        raise ValueError("heatmaps must be non-negative for this metric (min-max normalise them first)")
    return heatmaps


def check_masks(masks: Tensor, heatmaps: Tensor) -> Tensor:
    """Validate bool ground-truth masks of the heatmaps' shape and device."""
    if not isinstance(masks, Tensor):
        raise ValueError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor, got {masks.dtype}")
    if masks.shape != heatmaps.shape:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not match heatmaps of shape {tuple(heatmaps.shape)}")
    if masks.device != heatmaps.device:
        raise ValueError(f"masks are on {masks.device} but heatmaps on {heatmaps.device}")
    return masks


def _out_dtype(heatmaps: Tensor) -> torch.dtype:
    return torch.promote_types(heatmaps.dtype, torch.float32)


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """``N x 4`` boxes ``(x0, y0, x1, y1)`` in pixels (x along columns, x1/y1 exclusive) as ``N x H x W``
    bool masks: pixel ``(i, j)`` is inside when its centre ``(i + 0.5, j + 0.5)`` in edge coordinates lies in
    ``[y0, y1) x [x0, x1)``, so integer boxes cover rows ``y0..y1-1`` and columns ``x0..x1-1``."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be an N x 4 tensor (x0, y0, x1, y1), got {getattr(boxes, 'shape', type(boxes))}")
    if not bool(torch.isfinite(boxes.double()).all()):
        raise ValueError("boxes contain NaN or Inf values")
    boxes = boxes.to(torch.float64)
    rows = torch.arange(height, dtype=torch.float64, device=boxes.device) + 0.5
    cols = torch.arange(width, dtype=torch.float64, device=boxes.device) + 0.5
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))
    inside_rows = (rows >= y0) & (rows < y1)  # N x H
    inside_cols = (cols >= x0) & (cols < x1)  # N x W
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def otsu_threshold(heatmaps: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold of each heatmap, as ``skimage.filters.threshold_otsu(map, nbins=bins)`` computes it.

    A histogram of ``bins`` equal bins over ``[min, max]`` of the map (numpy's binning: edges
    ``min + k (max - min) / bins``, the maximum in the last bin); for each split after bin ``k`` the
    between-class variance ``w1(k) w2(k+1) (m1(k) - m2(k+1))^2`` with ``w`` the pixel counts and ``m`` the
    mean bin centres of the bins up to k and from k+1; the threshold is the centre of the bin ``k`` that
    maximises it (the first such k on ties). A constant map's threshold is its value (so ``map > t`` is
    empty). Computed in float64 on the heatmaps' device; returns ``B``. Equal to skimage's for float64 maps and
    for float32 maps spanning [0, 1] (min-max normalised: edges ``k / bins`` are exact in both); numpy bins
    other float32 maps with float32 edges, so there a value within rounding of an edge may land in the next
    bin (4 of 300 random maps moved the threshold one bin in a helper's check).
    """
    check_heatmaps(heatmaps)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    values = heatmaps.reshape(heatmaps.shape[0], -1).to(torch.float64)
    low = values.min(dim=1, keepdim=True).values
    high = values.max(dim=1, keepdim=True).values
    constant = (high == low).squeeze(1)
    step = torch.where(high > low, (high - low) / bins, torch.ones_like(high))
    edges = low + step * torch.arange(bins + 1, dtype=torch.float64, device=values.device)
    edges[:, -1:] = torch.where(high > low, high, edges[:, -1:])  # as numpy's linspace: the last edge is the maximum
    # numpy's uniform binning: the scaled index, corrected against the edges themselves
    index = ((values - low) / step).floor().clamp_(0, bins - 1).long()
    index -= (values < edges.gather(1, index)).long()
    index += ((values >= edges.gather(1, index + 1)) & (index != bins - 1)).long()
    counts = torch.zeros(values.shape[0], bins, dtype=torch.float64, device=values.device)
    counts.scatter_add_(1, index, torch.ones_like(values))
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    weight1 = counts.cumsum(1)
    weight2 = counts.flip(1).cumsum(1).flip(1)
    mean1 = (counts * centres).cumsum(1) / weight1.clamp(min=1)
    mean2 = (counts * centres).flip(1).cumsum(1).flip(1) / weight2.clamp(min=1)
    between = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    threshold = centres.gather(1, between.argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(constant, low.squeeze(1), threshold)


def binarise(heatmaps: Tensor, threshold: float | str = "otsu") -> Tensor:
    """``heatmaps > t`` (strictly greater), with ``t`` Otsu's threshold of each map (``"otsu"``, see
    :func:`otsu_threshold`) or one fixed number for all maps. Returns ``B x H x W`` bool."""
    check_heatmaps(heatmaps)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number, got {threshold!r}")
        t = otsu_threshold(heatmaps)
        return heatmaps.to(torch.float64) > t[:, None, None]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
        raise ValueError(f"threshold must be 'otsu' or a number, got {threshold!r}")
    return heatmaps > threshold


def mask_iou(predicted: Tensor, masks: Tensor) -> Tensor:
    """``|P and G| / |P or G|`` per image for bool masks ``P`` and ``G`` (``B x H x W``); 0 when the union is
    empty (both masks empty). Returns ``B`` float64 (the exact ratio of two counts, rounded once)."""
    if not isinstance(predicted, Tensor) or predicted.dtype != torch.bool:
        raise ValueError("predicted masks must be a bool tensor")
    if predicted.dim() != 3:
        raise ValueError(f"predicted masks must be B x H x W, got shape {tuple(predicted.shape)}")
    check_masks(masks, predicted)
    intersection = (predicted & masks).flatten(1).sum(1)
    union = (predicted | masks).flatten(1).sum(1)
    ratio = intersection.to(torch.float64) / union.clamp(min=1).to(torch.float64)
    return torch.where(union > 0, ratio, 0.0)


def iou(heatmaps: Tensor, masks: Tensor, threshold: float | str = "otsu") -> Tensor:
    """Intersection over union of the binarised heatmap ``P = heatmap > t`` (see :func:`binarise`: Otsu's
    threshold by default, or a fixed ``t``) and the ground-truth mask ``G``: ``|P and G| / |P or G|``, 0 when
    the union is empty. A constant (or all-zero) heatmap has an empty ``P`` under Otsu, so its IoU is 0."""
    check_heatmaps(heatmaps)
    check_masks(masks, heatmaps)
    return mask_iou(binarise(heatmaps, threshold), masks).to(_out_dtype(heatmaps))


def centre_of_mass(maps: Tensor) -> Tensor:
    """Intensity-weighted mean ``(row, column)`` of each non-negative map (``B x 2``, float64):
    ``sum_ij m_ij (i, j) / sum_ij m_ij``. An all-zero map is scored as a constant one: its centre is the
    image centre ``((H - 1) / 2, (W - 1) / 2)``. Bool masks are taken as 0/1 maps, except that an empty mask
    has no centre: NaN."""
    if isinstance(maps, Tensor) and maps.dtype == torch.bool:
        if maps.dim() != 3:
            raise ValueError(f"masks must be B x H x W, got shape {tuple(maps.shape)}")
        weights = maps.to(torch.float64)
        empty = ~maps.flatten(1).any(1)
    else:
        check_heatmaps(maps, nonnegative=True)
        weights = maps.to(torch.float64)
        empty = None
    _, height, width = weights.shape
    total = weights.flatten(1).sum(1)
    rows = torch.arange(height, dtype=torch.float64, device=weights.device)
    cols = torch.arange(width, dtype=torch.float64, device=weights.device)
    row = (weights.sum(2) * rows).sum(1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    col = (weights.sum(1) * cols).sum(1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    centre = torch.stack([row, col], dim=1)
    middle = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=torch.float64, device=weights.device)
    fallback = torch.full_like(middle, float("nan")) if empty is not None else middle
    return torch.where((total == 0)[:, None], fallback, centre)


def centre_of_mass_distance(heatmaps: Tensor, masks: Tensor, normalise: bool = False) -> Tensor:
    """Euclidean distance between the heatmap's centre of mass (the continuous map's intensity-weighted
    mean pixel) and the ground-truth mask's (the mean of its pixels), in pixels of the heatmap grid; with
    ``normalise``, divided by the image diagonal ``sqrt(H^2 + W^2)`` (so in [0, 1]). An all-zero heatmap's
    centre is the image centre; an empty mask gives NaN. See :func:`centre_of_mass`."""
    check_heatmaps(heatmaps, nonnegative=True)
    check_masks(masks, heatmaps)
    distance = (centre_of_mass(heatmaps) - centre_of_mass(masks)).pow(2).sum(1).sqrt()
    if normalise:
        height, width = heatmaps.shape[-2:]
        distance = distance / (height**2 + width**2) ** 0.5
    return distance.to(_out_dtype(heatmaps))


def pointing_game(heatmaps: Tensor, masks: Tensor, tolerance: float = 0.0) -> Tensor:
    """Pointing game (Zhang et al., 2016): a hit (1) when the heatmap's maximum lies in the ground-truth mask
    dilated by ``tolerance`` pixels (a Euclidean disc: pixels within that distance of a mask pixel count as
    inside; Zhang et al. use 15 at their resolution), a miss (0) otherwise.

    Ties: when several pixels share the maximum, the score is the fraction of them inside the dilated mask,
    i.e. the expected hit under a uniformly random choice among them; so a constant (or all-zero) heatmap
    scores ``|dilated mask| / (H W)``, chance level. An empty mask scores 0.
    """
    check_heatmaps(heatmaps, nonnegative=True)
    check_masks(masks, heatmaps)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
        raise ValueError(f"tolerance must be a finite number of pixels >= 0, got {tolerance!r}")
    target = masks
    radius = min(int(tolerance), max(masks.shape[-2:]))  # a larger disc covers the same pixels
    if radius > 0:
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=masks.device)
        disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= tolerance**2).to(torch.float32)
        spread = F.conv2d(masks[:, None].to(torch.float32), disc[None, None], padding=radius)
        target = spread[:, 0] > 0.5
    peak = heatmaps == heatmaps.flatten(1).max(1).values[:, None, None]
    hits = (peak & target).flatten(1).sum(1)
    return (hits.to(torch.float64) / peak.flatten(1).sum(1).to(torch.float64)).to(_out_dtype(heatmaps))


def energy_in_mask(heatmaps: Tensor, masks: Tensor) -> Tensor:
    """Share of the heatmap's energy inside the ground truth (Wang et al., Score-CAM's energy-based pointing
    game): ``sum(heatmap * G) / sum(heatmap)`` for a non-negative heatmap; for a box, pass its mask
    (:func:`box_masks`). An all-zero heatmap is scored as a constant one: ``|G| / (H W)``. An empty mask
    gives 0."""
    check_heatmaps(heatmaps, nonnegative=True)
    check_masks(masks, heatmaps)
    weights = heatmaps.to(torch.float64).flatten(1)
    inside = masks.flatten(1)
    total = weights.sum(1)
    share = (weights * inside).sum(1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    uniform = inside.sum(1).to(torch.float64) / inside.shape[1]
    return torch.where(total > 0, share, uniform.to(torch.float64)).to(_out_dtype(heatmaps))
