"""Evaluation datasets: images with a ground-truth object mask each (from boxes or mask files).

Three sources, all giving a :class:`Dataset` of :class:`Sample` s whose ``load()`` returns the image
(``H x W x 3`` uint8) and its ground-truth mask (``H x W`` bool) at the image's original size:

- :func:`folder`, a simple layout::

      DIR/images/            the photos (any format Pillow reads; sub-folders are not searched)
      DIR/annotations.json   {"images": {"<file name in images/>": {"boxes": [[x0, y0, x1, y1], ...],
                                                                   "label": 3, "note": "..."}},
                              "classes": ["name of class 0", ...]}
      DIR/masks/<stem>.png   optional, instead of boxes: non-zero pixels are the object

  Boxes are in pixels of the original image as shown upright (the reader applies its EXIF orientation, and a
  mask must match that upright size), x along columns, ``(x1, y1)`` exclusive (so ``[0, 0, W, H]``
  is the whole image); several boxes are united. ``label`` (optional, all images or none) is the class to
  explain, an index into the model's outputs; ``classes`` (optional) names them and must then match the
  model's number of outputs. ``note`` is free text. Every image needs boxes or a mask (not both), and every
  annotated file must exist. ``annotations.json`` may be left out when every image has a mask.
- :func:`voc2012`: PASCAL VOC 2012 from a local copy of the official archive
  (``VOCtrainval_11-May-2012.tar`` extracted: ``VOCdevkit/VOC2012/{JPEGImages, Annotations, ImageSets,
  SegmentationClass}``), restricted as in the Winsor-CAM paper to the val images with exactly one object
  class (the paper reports 928 of the 1,449 in ``ImageSets/Segmentation/val.txt``).
- :func:`demo`: a few photos that ship with scikit-image, with boxes annotated by hand (``demo.json``).
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from wcam import cli
from wcam.metrics.localisation import box_masks

logger = logging.getLogger(__name__)

ANNOTATIONS = "annotations.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEMO_FILE = Path(__file__).with_name("demo.json")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
GROUND_TRUTHS = ("mask", "box")


class DatasetError(ValueError):
    """A dataset that cannot be read: missing folder or file, malformed JSON or XML, an unannotated image."""


@dataclass(frozen=True)
class Sample:
    """One evaluation image: a name, the class to explain (None: the model's top-1) and a loader of the
    image and its ground-truth mask at the original size."""

    name: str
    label: int | None
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Dataset:
    """Samples, with the names of the classes their labels index when the labels follow a fixed class list
    (VOC's 20); the evaluation then checks that the model has that many outputs."""

    name: str
    samples: list[Sample]
    classes: list[str] | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)


# ------------------------------------------------------------------ reading files


def _read_image(path: Path) -> np.ndarray:
    try:
        return cli._load_file(str(path))
    except cli.CliError as exc:
        raise DatasetError(str(exc)) from None


def _read_png(path: Path) -> np.ndarray:
    """A mask or label PNG as its raw values (palette indices for VOC's palette PNGs), ``H x W``."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            values = np.asarray(picture)
    except FileNotFoundError:
        raise DatasetError(f"no such mask file: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable mask"
        raise DatasetError(f"cannot read mask {path}: {cli._reason(exc)}") from exc
    if values.ndim == 3:  # colour or grey with alpha: object where any colour channel is non-zero (not alpha)
        return values[..., : 3 if values.shape[2] >= 3 else 1].any(axis=2)
    return values


def _check_mask(mask: np.ndarray, image: np.ndarray, what: str) -> np.ndarray:
    if mask.shape != image.shape[:2]:
        (h, w), (height, width) = mask.shape, image.shape[:2]
        raise DatasetError(f"{what} is {h}x{w} but its image is {height}x{width}")
    if not mask.any():
        raise DatasetError(f"{what} is empty: no object pixels")
    return mask


def _boxes_mask(boxes: np.ndarray, image: np.ndarray, what: str) -> np.ndarray:
    height, width = image.shape[:2]
    mask = box_masks(torch.from_numpy(boxes), height, width).any(0).numpy()
    if not mask.any():
        raise DatasetError(f"the boxes of {what} lie outside its {height}x{width} image")
    return mask


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"no such annotation file: {path}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed JSON in {path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {cli._reason(exc)}") from exc


# ------------------------------------------------------------------ annotations (folder layout and demo)


def _finite_number(value: Any) -> bool:
    """A JSON int or float (not a bool) that is finite as a float (an int past 1e308 is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _parse_boxes(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: 'boxes' must be a non-empty list of [x0, y0, x1, y1]")
    boxes = []
    for box in value:
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(_finite_number(v) for v in box)
        ):
            raise DatasetError(f"{where}: a box must be four numbers [x0, y0, x1, y1], got {box!r}")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise DatasetError(f"{where}: box {box!r} is empty (need x0 < x1 and y0 < y1)")
        boxes.append(box)
    return np.asarray(boxes, dtype=np.float64)


def _parse_annotations(data: Any, path: Path) -> tuple[dict[str, dict], list[str] | None]:
    """``{file: {"boxes": N x 4 array or None, "label": int or None}}`` and the class names, validated."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise DatasetError(f"{path}: expected an object with an 'images' object mapping file names to annotations")
    classes = data.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise DatasetError(f"{path}: 'classes' must be a list of class names")
    entries = {}
    for file, entry in data["images"].items():
        where = f"{path}: {file}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object with 'boxes' and/or 'label'")
        unknown = sorted(set(entry) - {"boxes", "label", "note"})
        if unknown:
            raise DatasetError(f"{where}: unknown key {unknown[0]!r} (known: boxes, label, note)")
        label = entry.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise DatasetError(f"{where}: 'label' must be a class index >= 0, got {label!r}")
        if classes is not None and label is not None and label >= len(classes):
            raise DatasetError(f"{where}: class index {label} out of range for {len(classes)} classes")
        boxes = _parse_boxes(entry["boxes"], where) if "boxes" in entry else None
        entries[file] = {"boxes": boxes, "label": label}
    return entries, classes


def _check_labels(samples: list[Sample], where: Path) -> list[Sample]:
    """Labels for all images or for none (a batch is explained for given classes or for its top-1s)."""
    unlabelled = [s.name for s in samples if s.label is None]
    if unlabelled and len(unlabelled) < len(samples):
        raise DatasetError(f"{where}: some images have a 'label' and some not (e.g. {unlabelled[0]}): give all or none")
    return samples


def _annotated_sample(image: Path, boxes: np.ndarray | None, mask: Path | None, label: int | None) -> Sample:
    def load() -> tuple[np.ndarray, np.ndarray]:
        picture = _read_image(image)
        if mask is not None:
            return picture, _check_mask(_read_png(mask) != 0, picture, f"mask {mask}")
        return picture, _boxes_mask(boxes, picture, str(image))

    return Sample(name=image.name, label=label, load=load)


def folder(root: str | Path) -> Dataset:
    """The folder layout described in this module's docstring."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"no such dataset folder: {root}")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"{root} has no images/ folder (expected {images_dir})")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images in {images_dir}")
    masks_dir = root / "masks"
    annotation_file = root / ANNOTATIONS
    entries: dict[str, dict] = {}
    classes = None
    if annotation_file.exists():
        entries, classes = _parse_annotations(_read_json(annotation_file), annotation_file)
    elif not masks_dir.is_dir():
        raise DatasetError(f"{root} has neither {ANNOTATIONS} nor a masks/ folder: no ground truth")
    names = {p.name for p in files}
    stray = sorted(set(entries) - names)
    if stray:
        raise DatasetError(f"{annotation_file}: annotated image {stray[0]} is not in {images_dir}")
    samples = []
    for image in files:
        entry = entries.get(image.name, {"boxes": None, "label": None})
        mask = masks_dir / f"{image.stem}.png"
        mask = mask if mask.is_file() else None
        if mask is not None and entry["boxes"] is not None:
            raise DatasetError(f"{image.name} has both boxes in {ANNOTATIONS} and a mask {mask}: give one")
        if mask is None and entry["boxes"] is None:
            expected = masks_dir / f"{image.stem}.png"
            raise DatasetError(f"image {image.name} has no annotation: no boxes in {annotation_file} and no {expected}")
        samples.append(_annotated_sample(image, entry["boxes"], mask, entry["label"]))
    return Dataset(name=str(root), samples=_check_labels(samples, annotation_file), classes=classes)


def demo() -> Dataset:
    """Photos that ship with scikit-image (in ``skimage.data.data_dir``) with boxes annotated by hand around
    the main object (``wcam/eval/demo.json``); no labels: the model's top-1 class is explained."""
    from skimage import data

    entries, classes = _parse_annotations(_read_json(DEMO_FILE), DEMO_FILE)
    unboxed = [file for file, entry in entries.items() if entry["boxes"] is None]
    if unboxed:
        raise DatasetError(f"{DEMO_FILE}: {unboxed[0]} has no boxes")
    root = Path(data.data_dir)
    samples = [_annotated_sample(root / file, entry["boxes"], None, entry["label"]) for file, entry in entries.items()]
    return Dataset(name="demo", samples=_check_labels(samples, DEMO_FILE), classes=classes)


# ------------------------------------------------------------------ PASCAL VOC 2012


def _voc_base(root: Path) -> Path:
    """``VOC2012`` inside ``root`` (given as VOC2012 itself, VOCdevkit, or the folder holding VOCdevkit)."""
    if not root.is_dir():
        raise DatasetError(f"no such VOC folder: {root}")
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (base / "Annotations").is_dir() and (base / "ImageSets").is_dir():
            return base
    raise DatasetError(f"{root} does not hold PASCAL VOC 2012: no VOCdevkit/VOC2012/Annotations and ImageSets")


def _voc_objects(path: Path) -> list[tuple[str, list[float]]]:
    """The (class name, box) of every object in a VOC annotation file; boxes as ``[x0, y0, x1, y1]`` in this
    module's convention (VOC's are 1-based and inclusive: ``[xmin - 1, ymin - 1, xmax, ymax]``)."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DatasetError(f"no such annotation file: {path}") from None
    except ET.ParseError as exc:
        raise DatasetError(f"malformed XML in {path}: {exc}") from None
    objects = []
    for node in tree.getroot().iter("object"):
        name = (node.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DatasetError(f"{path}: unknown VOC class {name!r}")
        box = node.find("bndbox")
        values = [None if box is None else box.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(v) for v in values)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: an object of class {name} has no valid bndbox") from None
        objects.append((name, [xmin - 1, ymin - 1, xmax, ymax]))
    return objects


def voc2012(root: str | Path, gt: str = "mask") -> Dataset:
    """PASCAL VOC 2012 val images with exactly one object class, as in the Winsor-CAM paper.

    The image list is ``ImageSets/Segmentation/val.txt`` (1,449 images, of which the paper reports 928 with
    one class; not checked against the real archive here, which this repository does not hold), or
    ``ImageSets/Main/val.txt`` when the segmentation list is absent. An image is kept when all the
    ``<object>`` elements of its ``Annotations/<id>.xml`` (difficult and truncated ones included) name one
    class. Its label is that class's index in :data:`VOC_CLASSES` (alphabetical, the usual order of 20-class
    heads). Ground truth: ``gt="mask"``, the pixels of that class in ``SegmentationClass/<id>.png`` (the
    255 "void" outlines excluded); ``gt="box"``, the union of the class's boxes in the XML.
    """
    if gt not in GROUND_TRUTHS:
        raise DatasetError(f"gt must be one of {GROUND_TRUTHS}, got {gt!r}")
    base = _voc_base(Path(root))
    listing = base / "ImageSets" / "Segmentation" / "val.txt"
    if not listing.is_file():
        listing = base / "ImageSets" / "Main" / "val.txt"
        if not listing.is_file():
            raise DatasetError(f"{base} has no ImageSets/Segmentation/val.txt nor ImageSets/Main/val.txt")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    samples = []
    for image_id in ids:
        objects = _voc_objects(base / "Annotations" / f"{image_id}.xml")
        classes = {name for name, _ in objects}
        if len(classes) != 1:
            continue
        name = classes.pop()
        label = VOC_CLASSES.index(name)
        image = base / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise DatasetError(f"no such image: {image} (listed in {listing})")
        if gt == "mask":
            segmentation = base / "SegmentationClass" / f"{image_id}.png"
            if not segmentation.is_file():
                raise DatasetError(f"no such mask file: {segmentation} (the box ground truth needs none)")
            samples.append(_voc_mask_sample(image, segmentation, label))
        else:
            boxes = np.asarray([box for n, box in objects if n == name], dtype=np.float64)
            samples.append(_annotated_sample(image, boxes, None, label))
    logger.info("%s: %d of %d images have exactly one object class", listing, len(samples), len(ids))
    if not samples:
        raise DatasetError(f"no image in {listing} has exactly one object class")
    return Dataset(name=f"VOC2012 {listing.parent.name}/val", samples=samples, classes=list(VOC_CLASSES))


def _voc_mask_sample(image: Path, segmentation: Path, label: int) -> Sample:
    def load() -> tuple[np.ndarray, np.ndarray]:
        picture = _read_image(image)
        mask = _read_png(segmentation) == label + 1
        return picture, _check_mask(mask, picture, f"class {VOC_CLASSES[label]} in {segmentation}")

    return Sample(name=image.name, label=label, load=load)
