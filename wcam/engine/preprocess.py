"""Turning user images (PIL, uint8 arrays/tensors, or normalised float tensors) into a network batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wcam.kernels.transfer import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """Images of the wrong type, shape, dtype or with NaN/Inf values."""


@dataclass(frozen=True)
class Preprocess:
    """How raw images become network input: resized (whole image, no crop) to ``size``, then normalised.

    No crop, so that a heatmap covers the whole picture it is drawn over.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(
        self, images: Any, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Return the ``B x 3 x H x W`` batch (in ``dtype``) and each image's original ``(height, width)``.

        A float tensor ``B x 3 x H x W`` is taken as already normalised and used as is; PIL images and
        uint8 arrays/tensors (``H x W x 3`` numpy, ``3 x H x W`` torch, or batches of them) are resized and
        normalised here.
        """
        if isinstance(images, Tensor) and images.dtype.is_floating_point:
            batch = _check_float_batch(images)
            return batch.to(device=device, dtype=dtype), [tuple(batch.shape[-2:])] * batch.shape[0]
        if isinstance(images, Tensor) and images.dim() == 4 and images.dtype == torch.uint8 and images.shape[1] == 3:
            if images.shape[0] == 0:
                raise ImageError(f"empty image batch of shape {tuple(images.shape)}")
            _check_size(images[0])  # one batch of equal-sized frames (video): resized in one call, on the device
            return self._normalise(images, device, dtype), [tuple(images.shape[-2:])] * images.shape[0]
        pictures = [_to_chw_uint8(item) for item in _as_list(images)]
        if not pictures:
            raise ImageError("no images given")
        batch = torch.cat([self._normalise(picture.unsqueeze(0), device, dtype) for picture in pictures])
        return batch, [tuple(p.shape[-2:]) for p in pictures]

    def _normalise(self, pictures: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``B x 3 x h x w`` uint8 to the normalised network input in ``dtype``, resized (antialiased bilinear)
        on ``device``. On a CPU the resize runs on the uint8 pixels (torch's vectorised path, as torchvision's
        Resize: ~15x faster for video frames, at the cost of rounding the resized pixels to integers); on a
        GPU in float32 or wider (antialiased resizing has no fp16/bf16 or uint8 kernels there)."""
        work = torch.promote_types(dtype, torch.float32)
        pictures = pictures.to(device)
        resize = tuple(pictures.shape[-2:]) != self.size
        if resize and pictures.device.type == "cpu":
            pictures = F.interpolate(pictures, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            resize = False
        x = pictures.to(dtype=work).div_(255.0)
        if resize:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        mean = to_device(torch.tensor(self.mean, dtype=work).view(1, 3, 1, 1), device)
        std = to_device(torch.tensor(self.std, dtype=work).view(1, 3, 1, 1), device)
        return ((x - mean) / std).to(dtype).contiguous()


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _check_float_batch(images: Tensor) -> Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ImageError(f"a float image tensor must be B x 3 x H x W, got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ImageError(f"empty image batch of shape {tuple(images.shape)}")
    # one reduction instead of an elementwise mask: NaN/Inf anywhere makes the sum non-finite; fp16/bf16 sum in
    # float32 (a float16 sum overflows past 65504), where a finite sum overflows only past 3e38
    if not bool(torch.isfinite(images.sum(dtype=torch.promote_types(images.dtype, torch.float32)))):
        raise ImageError("the images contain NaN or Inf values")
    return images


def _to_chw_uint8(item: Any) -> Tensor:
    """One image as a ``3 x H x W`` uint8 tensor."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a core dependency
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        return _check_size(torch.from_numpy(np.asarray(item.convert("RGB")).copy()).permute(2, 0, 1))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ImageError(f"numpy images must be uint8 H x W x 3, got dtype {item.dtype}")
        if item.ndim == 2:
            item = np.repeat(item[..., None], 3, axis=2)
        if item.ndim != 3 or item.shape[2] not in (3, 4):
            raise ImageError(f"numpy images must be H x W x 3 (RGB), got shape {item.shape}")
        return _check_size(torch.from_numpy(np.ascontiguousarray(item[..., :3])).permute(2, 0, 1))
    if isinstance(item, Tensor):
        if item.dtype != torch.uint8:
            raise ImageError(
                f"image tensors must be float B x 3 x H x W (normalised) or uint8 3 x H x W, got {item.dtype} "
                f"{tuple(item.shape)}"
            )
        if item.dim() != 3 or item.shape[0] != 3:
            raise ImageError(f"uint8 image tensors must be 3 x H x W, got shape {tuple(item.shape)}")
        return _check_size(item)
    raise ImageError(f"cannot read an image from {type(item).__name__}: give PIL images, uint8 arrays or tensors")


def _check_size(picture: Tensor) -> Tensor:
    if picture.shape[1] == 0 or picture.shape[2] == 0:
        raise ImageError(f"empty image of size {tuple(picture.shape[1:])}")
    return picture
