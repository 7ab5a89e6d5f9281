"""ONNX graphs of an engine's model: ``features`` (logits, activations, gradients) or ``full`` (Winsor-CAM
heatmaps, with p a run-time input), with the metadata that makes the file alone enough to serve it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from wcam.export.decompositions import UnsupportedOpError
from wcam.export.joint import trace_joint
from wcam.kernels import layer_maps
from wcam.kernels.dispatch import TorchKernels

if TYPE_CHECKING:
    from wcam.engine.engine import Engine

logger = logging.getLogger(__name__)

GRAPHS = ("features", "full")
_TWO_GB = 2**31 - 2**20  # protobuf's limit, with a margin for the graph itself


def require(module: str) -> object:
    """Import an optional dependency of the ONNX features, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module} is not installed; the ONNX features need the onnx extra: pip install -e '.[onnx]' in wcam's clone"
        ) from None


class OnnxFormatError(ValueError):
    """A file that is not an ONNX graph exported by wcam (corrupt, foreign, or missing its metadata)."""


@dataclass(frozen=True)
class GraphInfo:
    """What a wcam ONNX file records about itself (its ``metadata_props``)."""

    graph: str
    layers: list[str]
    gradcam_layer: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    num_classes: int
    categories: list[str] | None
    wcam_version: str

    def to_metadata(self) -> dict[str, str]:
        return {
            "wcam_version": self.wcam_version,
            "wcam_graph": self.graph,
            "wcam_layers": json.dumps(self.layers),
            "wcam_gradcam_layer": self.gradcam_layer,
            "wcam_input_size": json.dumps(list(self.input_size)),
            "wcam_mean": json.dumps(list(self.mean)),
            "wcam_std": json.dumps(list(self.std)),
            "wcam_interpolation": self.interpolation,
            "wcam_num_classes": str(self.num_classes),
            "wcam_categories": json.dumps(self.categories),
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str) -> "GraphInfo":
        try:
            return cls(
                graph=props["wcam_graph"],
                layers=json.loads(props["wcam_layers"]),
                gradcam_layer=props["wcam_gradcam_layer"],
                input_size=tuple(json.loads(props["wcam_input_size"])),
                mean=tuple(json.loads(props["wcam_mean"])),
                std=tuple(json.loads(props["wcam_std"])),
                interpolation=props["wcam_interpolation"],
                num_classes=int(props["wcam_num_classes"]),
                categories=json.loads(props["wcam_categories"]),
                wcam_version=props["wcam_version"],
            )
        except (KeyError, ValueError) as exc:
            raise OnnxFormatError(f"{source} is an ONNX graph but not one exported by wcam (metadata: {exc})") from None


def activation_name(layer: str) -> str:
    return f"activation:{layer}"


def gradient_name(layer: str) -> str:
    return f"gradient:{layer}"


class _FullGraph(nn.Module):
    """The joint graph followed by the CAM maths: (images, targets, p) -> logits, targets, heatmaps, weights."""

    def __init__(self, joint: torch.fx.GraphModule, count: int, size: tuple[int, int], interpolation: str) -> None:
        super().__init__()
        self.joint = joint
        self.count = count
        self.size = size
        self.interpolation = interpolation

    def forward(self, images: Tensor, targets: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from wcam.engine.explanation import combine

        outputs = self.joint(images, targets)
        logits, chosen = outputs[0], outputs[1]
        maps = layer_maps(outputs[2 : 2 + self.count], outputs[2 + self.count :])
        weights, _, _, heatmaps = combine(
            maps, "winsor", p, range(self.count), self.size, self.interpolation, TorchKernels()
        )
        return logits, chosen, heatmaps, weights


def _refuse_divisor_override(joint: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """ONNX's AveragePool has no divisor: the exporter writes ``avg_pool2d(divisor_override=d)`` as a plain
    average, a silently different network. Refuse it instead, naming the pooling layers that set one."""
    for node in joint.graph.nodes:
        if node.target is torch.ops.aten.avg_pool2d.default and len(node.args) > 6 and node.args[6]:
            layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.AvgPool2d) and m.divisor_override]
            raise UnsupportedOpError("avg_pool2d", f"divisor_override={node.args[6]} (ONNX's AveragePool has no "
                                     "divisor; the exporter would drop it)", layers)


def export_onnx(
    model_or_engine: "nn.Module | Engine",
    path: str | Path,
    layers: Sequence[str] | None = None,
    graph: str = "features",
    opset: int | None = None,
    optimize: bool = False,
) -> GraphInfo:
    """Export ``model_or_engine`` to ``path`` as an ONNX graph with a dynamic batch axis.

    ``features``: inputs ``images`` (B x 3 x H x W, normalised) and ``targets`` (B int64, -1 = the argmax) ->
    ``logits``, ``targets_used``, then ``activation:<layer>`` and ``gradient:<layer>`` per layer (input-side
    gradients only); the engine's Grad-CAM layer is included when it is not among ``layers``. ``full``: inputs ``images``, ``targets``, ``p`` (a float scalar) -> ``logits``, ``targets``,
    ``heatmaps`` (B x H x W, normalised) and ``layer_weights`` (B x L). H x W is the engine's input size.
    Graphs whose weights exceed 2 GB keep them in an external data file beside ``path``. ``optimize`` runs
    the exporter's graph optimiser (slow on large graphs: +35 s on DenseNet121; ONNX Runtime optimises the
    graph itself when it loads it).
    """
    import wcam
    from wcam.engine.engine import Engine

    onnx = require("onnx")
    require("onnxscript")

    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    engine = model_or_engine if isinstance(model_or_engine, Engine) else Engine(model_or_engine)
    if engine.model is None:
        raise ValueError("this engine runs an ONNX graph already; export from an engine on a torch model")
    names = engine.layers_for("winsor", layers)
    traced = names + [engine.gradcam_layer] if graph == "features" and engine.gradcam_layer not in names else names
    size = engine.preprocess.size
    started = time.perf_counter()
    joint = trace_joint(engine.model, traced, size, engine.dtype)
    _refuse_divisor_override(joint, engine.model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    images = torch.zeros(2, 3, *size, dtype=engine.dtype)
    targets = torch.full((2,), -1, dtype=torch.long)
    if graph == "features":
        module, args = joint, (images, targets)
        inputs, shapes = ["images", "targets"], ({0: batch}, {0: batch})
        outputs = ["logits", "targets_used", *map(activation_name, traced), *map(gradient_name, traced)]
    else:
        module = _FullGraph(joint, len(names), size, engine.interpolation)
        args = (images, targets, torch.tensor(90.0))
        inputs, shapes = ["images", "targets", "p"], ({0: batch}, {0: batch}, None)
        outputs = ["logits", "targets_used", "heatmaps", "layer_weights"]
    try:
        # no_grad: the joint graph holds its own backward; a model's trainable parameters must not make the
        # exporter record a second one (the full graph's resampling has no autograd formula)
        with torch.no_grad():
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                opset_version=opset, optimize=optimize, verbose=False,
            )
    except Exception as exc:  # the exporter's own errors: an aten op with no ONNX translation, typically
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedOpError("the graph", f"the ONNX exporter failed: {first}") from exc
    info = GraphInfo(
        graph=graph,
        layers=names,
        gradcam_layer=engine.gradcam_layer,
        input_size=tuple(size),
        mean=tuple(engine.preprocess.mean),
        std=tuple(engine.preprocess.std),
        interpolation=engine.interpolation,
        num_classes=int(program.model_proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value),
        categories=engine.categories,
        wcam_version=wcam.__version__,
    )
    proto = program.model_proto
    for key, value in info.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = sum(t.numel() * t.element_size() for t in engine.model.state_dict().values()) > _TWO_GB
    onnx.save_model(proto, str(path), save_as_external_data=external, location=path.name + ".data" if external else None)
    logger.info("exported %s graph of %d layers to %s in %.1f s", graph, len(names), path, time.perf_counter() - started)
    return info


def read_info(path: str | Path) -> GraphInfo:
    """The metadata of a wcam ONNX file; a missing, corrupt or foreign file raises a clear error."""
    onnx = require("onnx")

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for bytes that are not a graph
        raise OnnxFormatError(f"{path} is not a readable ONNX graph ({type(exc).__name__})") from None
    return GraphInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))
