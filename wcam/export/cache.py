"""On-disk cache of exported graphs, keyed by what determines the graph: weights, layers, size, versions."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wcam.engine.engine import Engine


def default_cache_dir() -> Path:
    """``$WCAM_CACHE``, else ``$XDG_CACHE_HOME/wcam``, else ``~/.cache/wcam``."""
    if os.environ.get("WCAM_CACHE"):
        return Path(os.environ["WCAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wcam"


def _structure(model: torch.nn.Module) -> list[list[object]]:
    """What shapes the graph besides the tensors: each module's name and class, its plain settings (strides,
    flags such as Inception's ``transform_input``) and a digest of its class's ``forward`` bytecode (a ReLU and
    a SiLU model with the same weights must not share a graph, nor one whose forward was edited)."""
    found: list[list[object]] = []
    for name, module in model.named_modules():
        cls = type(module)
        settings = sorted((k, repr(v)) for k, v in vars(module).items()
                          if not k.startswith("_") and k != "training" and _plain(v))
        code = getattr(cls.forward, "__code__", None)
        found.append([name, f"{cls.__module__}.{cls.__qualname__}", settings,
                      hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest() if code else None])
    return found


def _plain(value: object) -> bool:
    """A value whose repr is the same in every process (no object addresses)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None)))


def graph_key(engine: "Engine", opset: int | None) -> str:
    """A digest of the model's weights and buffers, its structure (:func:`_structure`), the layers, input
    size, dtype, opset and versions."""
    import wcam

    digest = hashlib.sha256()
    for name, tensor in engine.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = [engine.layers, engine.gradcam_layer, list(engine.preprocess.size), list(engine.preprocess.mean),
                list(engine.preprocess.std), engine.interpolation, str(engine.dtype), opset,
                wcam.__version__, torch.__version__, _structure(engine.model)]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()[:24]


def cached_features_graph(engine: "Engine", cache_dir: str | Path | None = None, opset: int | None = None) -> Path:
    """The ``features`` graph of ``engine``'s model, exported once and reused on later starts."""
    from wcam.export.onnx_graph import export_onnx

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{type(engine.model).__name__}-{graph_key(engine, opset)}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:  # write, then rename: never a half file
            partial = Path(scratch) / path.name
            export_onnx(engine, partial, graph="features", opset=opset)
            for produced in Path(scratch).iterdir():
                os.replace(produced, folder / produced.name)
    return path
