"""Backbone runner on ONNX Runtime: a wcam ``features`` graph gives logits, activations and gradients, and
the same CAM maths as the eager runner turns them into layer maps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from wcam.engine.runner import BackboneResult, check_logits, graph_targets
from wcam.export.onnx_graph import GraphInfo, OnnxFormatError, activation_name, gradient_name, read_info, require
from wcam.kernels.dispatch import TorchKernels
from wcam.kernels.transfer import to_device

logger = logging.getLogger(__name__)

_ORT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
_INPUT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


class OnnxRunner:
    """Runs an exported ``features`` graph with ONNX Runtime (thread-safe: sessions allow concurrent runs).

    CPU tensors go through the CPU execution provider. With onnxruntime-gpu, CUDA tensors are bound in place
    (I/O binding: inputs read from and outputs written to torch's CUDA memory, no host copies).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None) -> None:
        ort = require("onnxruntime")

        self.info: GraphInfo = read_info(path)
        if self.info.graph != "features":
            raise OnnxFormatError(
                f"{path} is a {self.info.graph!r} graph; the engine runs 'features' graphs "
                "(a 'full' graph is served as is, by any ONNX runtime)"
            )
        available = ort.get_available_providers()
        chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        # no busy-waiting of ORT's worker threads after a run: the CAM maths that follows runs in torch on the
        # same cores (measured: spinning slowed the next torch call on the 2-core CPU by ~20 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph classes
            raise OnnxFormatError(f"ONNX Runtime cannot load {path}: {exc}") from None
        self._shapes = {o.name: o.shape for o in self.session.get_outputs()}
        self.dtype = _INPUT_TYPES[self.session.get_inputs()[0].type]
        self._warned = False

    def run(self, images: Tensor, layers: Sequence[str], targets: object, kernels: TorchKernels) -> BackboneResult:
        expected = (3, *self.info.input_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"this graph takes images of shape B x {' x '.join(map(str, expected))}, got {tuple(images.shape)}"
            )
        missing = [name for name in layers if name not in self.info.layers and name != self.info.gradcam_layer]
        if missing:
            raise ValueError(f"layers not in the exported graph: {', '.join(missing)}")
        chosen = graph_targets(targets, images.shape[0], self.info.num_classes)
        names = ["logits", "targets_used", *map(activation_name, layers), *map(gradient_name, layers)]
        if images.is_cuda and "CUDAExecutionProvider" in self.session.get_providers():
            values = self._run_bound(images.contiguous(), to_device(chosen, images.device), names)
        else:  # CUDA images without onnxruntime-gpu too: the CPU provider runs, the maths stays on their device
            if images.is_cuda and not self._warned:
                self._warned = True
                logger.warning("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu): running on the CPU")
            arrays = self.session.run(names, {"images": images.detach().cpu().numpy(), "targets": chosen.numpy()})
            values = [to_device(torch.from_numpy(a), images.device) for a in arrays]
        logits, used = values[0], values[1]
        check_logits(logits)
        count = len(layers)
        maps = kernels.layer_maps(values[2 : 2 + count], values[2 + count :])
        return BackboneResult(logits=logits, targets=used, maps=maps)

    def _run_bound(self, images: Tensor, targets: Tensor, names: list[str]) -> list[Tensor]:
        """One run with inputs and outputs in torch's CUDA memory (I/O binding)."""
        binding = self.session.io_binding()
        device = images.device.index or 0
        binding.bind_input("images", "cuda", device, _ORT_TYPES[images.dtype], list(images.shape), images.data_ptr())
        binding.bind_input("targets", "cuda", device, np.int64, list(targets.shape), targets.data_ptr())
        outputs = []
        for name in names:
            shape = [images.shape[0] if not isinstance(d, int) else d for d in self._shapes[name]]
            dtype = torch.long if name == "targets_used" else images.dtype
            out = torch.empty(shape, dtype=dtype, device=images.device)
            binding.bind_output(name, "cuda", device, np.int64 if dtype == torch.long else _ORT_TYPES[dtype], shape, out.data_ptr())
            outputs.append(out)
        self.session.run_with_iobinding(binding)
        return outputs
