"""Which layers Winsor-CAM hooks: discovery of every Conv2d, the authors' presets, and name resolution."""

from __future__ import annotations

import difflib
import operator
from typing import Iterable, Sequence

from torch import nn


class UnknownLayerError(ValueError):
    """A layer name that the model does not have (the message lists the closest existing names)."""


def conv_layers(model: nn.Module) -> list[str]:
    """Names of every ``nn.Conv2d`` in ``named_modules()`` order (1x1, depthwise, downsample included)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


EFFICIENTNET_DROPPED = ("fc1", "fc2", "block.0.0", "block.3.0")  # the authors' EfficientNet-B0 preset, by name


def preset_layers(model: nn.Module) -> list[str]:
    """The default layer set: every Conv2d, with the authors' presets applied by architecture.

    InceptionV3 drops every module under ``AuxLogits``; torchvision's EfficientNet drops every conv whose name
    contains ``fc1`` or ``fc2`` (squeeze-excitation), ``block.0.0`` or ``block.3.0`` (the expand and project
    convs of an MBConv block): the names ``shared/spec/winsor-cam.md`` gives for the authors' preset. In the
    blocks without an expand conv (``features.1.*``) those names match the depthwise conv instead, which is
    dropped, and the project conv (``block.2.0``) is kept: the names are the definition.
    """
    from torchvision.models import EfficientNet, Inception3

    names = conv_layers(model)
    if isinstance(model, Inception3):
        names = [n for n in names if not n.startswith("AuxLogits.")]
    elif isinstance(model, EfficientNet):
        names = [n for n in names if not any(part in n for part in EFFICIENTNET_DROPPED)]
    return names


def resolve_layers(model: nn.Module | Sequence[str], names: Iterable[str]) -> list[str]:
    """Check that every name is a module of ``model`` (or one of a list of names); an unknown one raises
    with the closest names."""
    if isinstance(model, nn.Module):
        known, owner = [n for n, _ in model.named_modules() if n], type(model).__name__
    else:
        known, owner = list(model), "the exported graph"
    present = set(known)
    resolved = []
    for name in names:
        if not isinstance(name, str) or name not in present:
            suggestions = difflib.get_close_matches(str(name), known, n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(suggestions)}" if suggestions else ""
            raise UnknownLayerError(f"unknown layer {name!r} in {owner}{hint}")
        resolved.append(name)
    if len(set(resolved)) != len(resolved):
        raise ValueError("layer names must be unique")
    if not resolved:
        raise ValueError("need at least one layer")
    return resolved


def as_index(item: object) -> int | None:
    """An integer index from an int, a numpy integer or a 0-d integer tensor (``operator.index``); None for
    anything else (bools included: ``True`` is no layer)."""
    if isinstance(item, bool):
        return None
    try:
        return operator.index(item)
    except TypeError:
        return None


def select_layers(layer_names: Sequence[str], selection: object) -> list[int]:
    """Indices into ``layer_names`` chosen by a ``slice`` (e.g. ``slice(10, 40)``) or names or indices."""
    count = len(layer_names)
    if isinstance(selection, slice):
        indices = list(range(count))[selection]
    elif isinstance(selection, (str, bytes)):
        raise TypeError("layers must be a slice or a sequence of names or indices, not a single string")
    else:
        position = {name: i for i, name in enumerate(layer_names)}
        indices = []
        for item in selection:  # type: ignore[attr-defined]
            if isinstance(item, str):
                if item not in position:
                    suggestions = difflib.get_close_matches(item, layer_names, n=5, cutoff=0.5)
                    hint = f"; closest: {', '.join(suggestions)}" if suggestions else ""
                    raise UnknownLayerError(f"layer {item!r} is not among the explained layers{hint}")
                indices.append(position[item])
            else:
                index = as_index(item)
                if index is None or not -count <= index < count:
                    raise UnknownLayerError(f"layer index {item!r} out of range for {count} layers")
                indices.append(index % count)
    if not indices:
        raise ValueError("the layer selection is empty")
    return sorted(set(indices))
