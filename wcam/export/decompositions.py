"""Decompositions that let a joint forward + activation-gradient graph be expressed in ONNX.

The ONNX exporter has no translation for ``aten.convolution_backward`` and the pooling backwards. Only
input-side gradients are ever needed (never parameter gradients), and those are ordinary ops:
the input gradient of a convolution is a transposed convolution with the same weight, and the input gradient
of average pooling is a grouped transposed convolution with a constant kernel. torch's own decompositions
cover the activation, normalisation and max-pool backwards.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch._decomp import get_decompositions

aten = torch.ops.aten


class UnsupportedOpError(RuntimeError):
    """An op of the model that the exported graph cannot express; ``op`` names it, ``layers`` the modules
    of the model that run it (empty when it is called functionally)."""

    def __init__(self, op: str, reason: str, layers: Sequence[str] = ()) -> None:
        where = f" (in {', '.join(layers)})" if layers else ""
        super().__init__(f"cannot export {op}{where}: {reason}")
        self.op, self.reason, self.layers = op, reason, list(layers)

    def located(self, layers: Sequence[str]) -> "UnsupportedOpError":
        return UnsupportedOpError(self.op, self.reason, layers)


# which module types run each op a decomposition may refuse, to name the layers in the error
OP_MODULES: dict[str, tuple[type, ...]] = {
    "convolution_backward": (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
                             torch.nn.Conv1d, torch.nn.Conv3d),
}


def _output_padding(
    grad_size: Sequence[int], input_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int],
) -> list[int]:
    """Extra rows/cols a transposed convolution needs to give back the forward input's size."""
    return [
        input_size[d] - ((grad_size[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + 1)
        for d in range(2)
    ]


def _convolution_backward(
    grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask
):
    if transposed or output_mask[1] or output_mask[2] or weight.dim() != 4:
        raise UnsupportedOpError(
            "convolution_backward",
            "only input gradients of 2-D, non-transposed convolutions can be exported "
            f"(transposed={transposed}, weight gradient requested={bool(output_mask[1])})",
        )
    grad_input = None
    if output_mask[0]:
        kernel = weight.shape[2:]
        flipped_padding = [dilation[d] * (kernel[d] - 1) - padding[d] for d in range(2)]
        if all(s == 1 for s in stride) and all(p >= 0 for p in flipped_padding):
            # stride 1: a plain convolution with the flipped, channel-transposed kernel, which runtimes
            # optimise far better than a transposed one (ONNX Runtime's depthwise ConvTranspose is slow)
            out_channels, in_per_group = weight.shape[0], weight.shape[1]
            flipped = (
                weight.reshape(groups, out_channels // groups, in_per_group, *kernel)
                .transpose(1, 2)
                .reshape(groups * in_per_group, out_channels // groups, *kernel)
                .flip(2, 3)
            )
            grad_input = aten.convolution(
                grad_output, flipped, None, [1, 1], flipped_padding, dilation, False, [0, 0], groups
            )
        else:
            extra = _output_padding(grad_output.shape[2:], input.shape[2:], kernel, stride, padding, dilation)
            grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, groups)
    return grad_input, None, None


def _pool_backward(grad_output, input, kernel, stride, padding, scale):
    """Gradient of a window average: spread ``grad_output * scale`` over each window (a grouped transposed
    convolution with a ones kernel). With ``ceil_mode`` the last window may hang past the input: the transposed
    convolution then comes out larger, and the rows and columns past the input (which it never had) are cut."""
    channels = input.shape[1]
    ones = torch.ones(channels, 1, *kernel, dtype=grad_output.dtype, device=grad_output.device)
    extra = _output_padding(grad_output.shape[2:], input.shape[2:], kernel, stride, padding, [1, 1])
    spread = aten.convolution(grad_output * scale, ones, None, stride, padding, [1, 1], True,
                              [max(e, 0) for e in extra], channels)
    if min(extra) < 0:
        spread = spread[:, :, : input.shape[2], : input.shape[3]]
    return spread


def _avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    kernel = list(kernel_size) * (2 // len(kernel_size))
    stride = list(stride or kernel) * (2 // len(stride or kernel))
    padding = list(padding) * (2 // len(padding))
    if divisor_override:
        scale = 1.0 / divisor_override
    elif count_include_pad and not ceil_mode:
        scale = 1.0 / (kernel[0] * kernel[1])
    else:
        scale = 1.0 / _window_sizes(input, grad_output.shape[2:], kernel, stride, padding, count_include_pad)
    return _pool_backward(grad_output, input, kernel, stride, padding, scale)


def _window_sizes(input, out_size, kernel, stride, padding, count_include_pad):
    """Each window's divisor as the forward average took it: its elements inside the input (with
    ``count_include_pad``: inside the padded input), ``1 x 1 x oh x ow``. Counted by a convolution of ones
    with a ones kernel, zero-extended at the far end for ``ceil_mode``'s last windows: not with
    ``avg_pool2d(divisor_override=1)``, which the ONNX exporter turns into a plain average (ONNX's
    AveragePool has no divisor)."""
    inside = [input.shape[2 + d] + (2 * padding[d] if count_include_pad else 0) for d in range(2)]
    pad = [0, 0] if count_include_pad else list(padding)
    ones = torch.ones(1, 1, *inside, dtype=input.dtype, device=input.device)
    extra = [max((out_size[d] - 1) * stride[d] + kernel[d] - inside[d] - 2 * pad[d], 0) for d in range(2)]
    if any(extra):
        ones = aten.constant_pad_nd(ones, [0, extra[1], 0, extra[0]], 0.0)
    window = torch.ones(1, 1, *kernel, dtype=input.dtype, device=input.device)
    return aten.convolution(ones, window, None, stride, pad, [1, 1], False, [0, 0], 1)


def _window_matrix(size, out_size, like):
    """``out_size x size`` 0/1 matrix: row i marks the input span [floor(i*size/out), ceil((i+1)*size/out))
    that adaptive pooling averages for output i (built from ops, so ``size`` may be symbolic)."""
    rows = torch.arange(out_size, device=like.device).unsqueeze(1)
    cols = torch.arange(size, device=like.device).unsqueeze(0)
    start = (rows * size) // out_size
    end = ((rows + 1) * size + out_size - 1) // out_size
    return ((cols >= start) & (cols < end)).to(like.dtype)


def _adaptive_avg_pool2d_backward(grad_output, input):
    (h, w), (oh, ow) = input.shape[-2:], grad_output.shape[-2:]
    if oh == 1 and ow == 1:
        return (grad_output / (h * w)).expand_as(input)
    rows, cols = _window_matrix(h, oh, grad_output), _window_matrix(w, ow, grad_output)
    area = rows.sum(dim=1).unsqueeze(1) * cols.sum(dim=1).unsqueeze(0)  # oh x ow window sizes
    spread = torch.matmul(rows.transpose(0, 1), grad_output / area)  # ... x h x ow
    return torch.matmul(spread, cols)  # ... x h x w


def _hardtanh_backward(grad_output, self, min_val, max_val):
    """Gradient passes where min < x < max: a multiply by a mask (ONNX Runtime's Where is single-threaded
    and took 27% of an EfficientNet-Lite0 graph; Mul is parallel)."""
    return grad_output * ((self > min_val) & (self < max_val)).to(grad_output.dtype)


def _threshold_backward(grad_output, self, threshold):
    return grad_output * (self > threshold).to(grad_output.dtype)


_TORCH_DECOMPOSED = [
    "native_batch_norm_backward", "max_pool2d_with_indices_backward",
    "hardswish_backward", "hardsigmoid_backward", "silu_backward", "sigmoid_backward", "gelu_backward",
    "native_layer_norm_backward", "native_group_norm_backward", "leaky_relu_backward", "tanh_backward",
    "elu_backward", "mish_backward", "softplus_backward", "_softmax_backward_data", "native_dropout_backward",
]


def decompositions() -> dict[Callable, Callable]:
    """The table for ``make_fx``: torch's own backward decompositions plus the three above."""
    table = get_decompositions([getattr(aten, name) for name in _TORCH_DECOMPOSED])
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.hardtanh_backward.default] = _hardtanh_backward
    table[aten.threshold_backward.default] = _threshold_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    return table
