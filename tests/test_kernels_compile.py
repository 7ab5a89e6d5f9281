"""The Triton kernels compile for the GPUs wcam targets, checked here without one.

The interpreter tests (``test_kernels_triton.py``) check the kernels' values, but Triton's interpreter runs
their Python as Python and accepts code that its compiler rejects. ``triton_compile.py`` compiles every
specialisation wcam launches (each dtype, interpolation, frame layout) down to a cubin for sm_90 (H100, H200),
with the ``ptxas`` that ships in Triton's wheel, and checks that none spills registers (``ptxas -v``). Each check runs in a child process: the kernels must be
compiled ``JITFunction``s, which they are not once this process has imported Triton under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent
KERNELS = {"_channel_weights_kernel", "_layer_cam_kernel", "_normalize_kernel", "_winsor_kernel", "_star_kernel",
           "_upsample_kernel", "_render_kernel", "_blend_kernel"}


def _child(args: list[str], tmp_path: Path, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join([str(HERE), str(tmp_path)]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def test_every_kernel_compiles_for_sm90_without_spilling(tmp_path):
    result = _child([str(HERE / "triton_compile.py"), "--arch", "90", "--ptxas-info"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = json.loads(result.stdout)["kernels"]
    spilling = [(name, signature, info) for name, signature, info in kernels if info["spill_stores"] or info["spill_loads"]]
    assert not spilling  # registers spilled to local memory: a tile too large for its warps
    approximate = [(name, signature) for name, signature, info in kernels if info["approximate_divisions"]]
    assert not approximate  # an fp32 `/` (div.full: 2 ulp) where torch rounds as IEEE: use ieee.divide
    compiled = [(name, signature) for name, signature, _ in kernels]
    assert {name for name, _ in compiled} == KERNELS
    for name in ("_channel_weights_kernel", "_layer_cam_kernel"):  # every input dtype the maps take
        assert {sig.split("DT=")[1].split(",")[0] for n, sig in compiled if n == name} == {"fp64", "fp32", "fp16", "bf16"}
    blends = {sig.split("CHANNELS=")[1] for n, sig in compiled if n == "_blend_kernel"}
    assert {b.split(", NEAREST")[0] for b in blends} == {"3, STEP=1", "1, STEP=1", "1, STEP=2"}  # RGB, 4:4:4, 4:2:0
    # maps 2 x 4 dtypes, normalise and winsor 2 x 2 accumulators, winsor at 4 more layer blocks (64 to 1024);
    # on fp64 and fp32 maps x 2 interpolations: star 4, upsample 8 (written or not), render 4, blend 12
    assert len(compiled) == 8 + 4 + 4 + 4 + 8 + 4 + 12


def test_the_check_rejects_a_kernel_that_the_interpreter_runs(tmp_path):
    """The check can fail: a loop-carried variable that changes type (int, then float) runs as Python under
    the interpreter, and is a compile error."""
    (tmp_path / "broken.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def total(x, n):
            acc = 0
            for i in range(n):
                acc += tl.load(x + i)
            tl.store(x, acc)
    '''))
    launch = "import torch, broken; x = torch.arange(4.0); broken.total[(1,)](x, 4)"
    interpreted = _child(["-c", f"{launch}; print(float(x[0]))"], tmp_path, interpret=True)
    assert interpreted.returncode == 0 and interpreted.stdout.strip() == "6.0", interpreted.stderr[-2000:]
    compiled = _child(["-c", f"from triton_compile import compile_only\nwith compile_only(90):\n    {launch}"], tmp_path)
    assert compiled.returncode != 0 and "CompilationError" in compiled.stderr, compiled.stderr[-2000:]
    assert "acc" in compiled.stderr
