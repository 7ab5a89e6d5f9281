"""Compile every Triton kernel specialisation wcam launches for a real NVIDIA GPU, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, the CI tests) runs the kernels' Python on the CPU and accepts
code that Triton's compiler rejects (a type it cannot unify, a pointer cast, an op unsupported for a dtype).
This script runs the same host launchers with a stand-in driver that reports a CUDA target of the given
compute capability and compiles each launch ahead of time (Triton IR, PTX, then a cubin by the ``ptxas``
that ships in Triton's wheel) instead of launching it. Outputs are left uninitialised: only compilation is
checked, not values (the interpreter tests and ``bench/gpu.py`` check those).

Run without ``TRITON_INTERPRET`` (the kernels must be ``JITFunction``s): ``python tests/triton_compile.py
--arch 90``. It prints one JSON object: ``{"arch": 90, "kernels": [[name, signature], ...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of a driver before it compiles: a device, a stream and the target."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@contextmanager
def compile_only(arch: int) -> Iterator[list[tuple[str, str]]]:
    """Within: every kernel launch compiles for ``sm_<arch>`` (``warmup=True``) and is not run; yields the
    list of ``(kernel name, signature with constexpr values)`` compiled so far."""
    compiled: list[tuple[str, str]] = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        assert kernel.asm.get("cubin"), f"{self.fn.__name__}: no cubin"
        constants = {self.arg_names[path[0]]: value for path, value in kernel.src.constants.items() if len(path) == 1}
        signature = (f"{k}={constants[k]}" if v == "constexpr" else f"{k}: {v}" for k, v in kernel.src.signature.items())
        compiled.append((self.fn.__name__, ", ".join(signature)))
        return kernel

    previous = driver._active  # None until a real driver was asked for (none can be, without a GPU)
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run = compile_instead
    try:
        yield compiled
    finally:
        JITFunction.run = run
        driver.set_active(previous)


def launch_everything() -> None:
    """Each Triton entry point wcam calls, on every dtype and option it takes (shapes are irrelevant)."""
    from wcam.kernels.dispatch import TritonKernels
    from wcam.kernels.frames import YUVFrames
    from wcam.overlay import TURBO_LUT

    kernels = TritonKernels()
    lut = torch.from_numpy(TURBO_LUT.copy())
    shapes = [(5, 7, 9), (40, 1, 1), (70, 7, 9)]
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        acts = [torch.randn(2, c, h, w).to(dtype) for c, h, w in shapes]
        maps = kernels.layer_maps(acts, acts)
        kernels.winsor_weights(maps.scores, 90.0)
    for dtype in (torch.float64, torch.float32):  # maps come in the accumulator dtype
        groups = [((7, 9), [0, 2], torch.rand(2, 2, 7, 9, dtype=dtype)), ((1, 1), [1], torch.rand(2, 1, 1, 1, dtype=dtype))]
        weights = torch.rand(2, 3, dtype=dtype)
        kernels.winsor_weights(weights, torch.tensor(50.0), mask=torch.tensor([True, False, True]))
        for interpolation in ("bilinear", "nearest"):
            star, _, _ = kernels.weighted_sum(groups, weights, (29, 37), interpolation)
            kernels.render(star, (31, 17), interpolation)
            frames = torch.randint(0, 256, (2, 30, 22, 3), dtype=torch.uint8)
            kernels.render(star, (30, 22), interpolation, frames=frames, alpha=0.4, lut=lut)
            for chroma in (1, 2):
                size = 30 * 22 + 2 * (30 // chroma) * (22 // chroma)
                yuv = YUVFrames(torch.randint(0, 256, (2, size), dtype=torch.uint8), 30, 22, chroma, "bt709")
                kernels.render(star, (30, 22), interpolation, frames=yuv, alpha=0.4, lut=lut)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")
    with compile_only(args.arch) as compiled:
        launch_everything()
    print(json.dumps({"arch": args.arch, "triton": triton.__version__, "kernels": sorted(set(compiled))}))


if __name__ == "__main__":
    main()
