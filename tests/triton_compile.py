"""Compile every Triton kernel specialisation wcam launches for a real NVIDIA GPU, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, the CI tests) runs the kernels' Python on the CPU and accepts
code that Triton's compiler rejects (a type it cannot unify, a pointer cast, an op unsupported for a dtype).
This script runs the same host launchers with a stand-in driver that reports a CUDA target of the given
compute capability and compiles each launch ahead of time (Triton IR, PTX, then a cubin by the ``ptxas``
that ships in Triton's wheel) instead of launching it. Outputs are left uninitialised: only compilation is
checked, not values (the interpreter tests and ``bench/gpu.py`` check those).

Run without ``TRITON_INTERPRET`` (the kernels must be ``JITFunction``s): ``python tests/triton_compile.py
--arch 90 [--ptxas-info]``. It prints one JSON object: ``{"arch": 90, "triton": version, "kernels": [[name,
signature, info], ...]}``, ``info`` holding the kernel's approximate divisions (``div.full`` or ``div.approx``
in its PTX, where torch rounds as IEEE: ``wcam.kernels.triton.ieee``) and, with ``--ptxas-info``, its
registers, spill bytes, shared memory and warps (``ptxas -v`` on its PTX).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel
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
def compile_only(arch: int) -> Iterator[dict[tuple[str, str], CompiledKernel]]:
    """Within: every kernel launch compiles for ``sm_<arch>`` (``warmup=True``) and is not run; yields the
    kernels compiled so far, by ``(kernel name, signature with constexpr values)``."""
    compiled: dict[tuple[str, str], CompiledKernel] = {}
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        assert kernel.asm.get("cubin"), f"{self.fn.__name__}: no cubin"
        constants = {self.arg_names[path[0]]: value for path, value in kernel.src.constants.items() if len(path) == 1}
        signature = (f"{k}={constants[k]}" if v == "constexpr" else f"{k}: {v}" for k, v in kernel.src.signature.items())
        compiled[(self.fn.__name__, ", ".join(signature))] = kernel
        return kernel

    previous = driver._active  # None until a real driver was asked for (none can be, without a GPU)
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run = compile_instead
    try:
        yield compiled
    finally:
        JITFunction.run = run
        driver.set_active(previous)


def approximate_divisions(kernel: CompiledKernel) -> int:
    """How many divisions in the kernel's PTX are not IEEE-rounded (``div.full.f32``, ``div.approx.f32``)."""
    return len(re.findall(r"\bdiv\.(?:full|approx)\.", kernel.asm["ptx"]))


def ptxas_info(kernel: CompiledKernel) -> dict[str, int]:
    """Registers per thread and spill bytes of a compiled kernel, from ``ptxas -v`` on its PTX."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    target = re.search(r"^\.target (\S+)", kernel.asm["ptx"], re.M).group(1)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(kernel.asm["ptx"])
        info = subprocess.run([str(ptxas), f"-arch={target}", "-v", str(source), "-o", str(Path(folder) / "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info).groups()
    registers = re.search(r"Used (\d+) registers", info).group(1)
    return {"registers": int(registers), "spill_stores": int(stores), "spill_loads": int(loads),
            "shared": kernel.metadata.shared, "warps": kernel.metadata.num_warps}


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
    for layers in (53, 120, 300, 1000):  # resnet50, densenet121, resnet152-sized, more: blocks of 64 to 1024 layers
        kernels.winsor_weights(torch.rand(2, layers, dtype=torch.float32), 90.0)
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
    parser.add_argument("--ptxas-info", action="store_true", help="add each kernel's registers and spills")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")
    with compile_only(args.arch) as compiled:
        launch_everything()
    kernels = [[name, signature, {"approximate_divisions": approximate_divisions(kernel),
                                  **(ptxas_info(kernel) if args.ptxas_info else {})}]
               for (name, signature), kernel in sorted(compiled.items())]
    print(json.dumps({"arch": args.arch, "triton": triton.__version__, "kernels": kernels}))


if __name__ == "__main__":
    main()
