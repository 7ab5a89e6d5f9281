"""Division as torch rounds it, for the kernels to give the torch path's numbers on a GPU.

Triton compiles an fp32 ``/`` to PTX ``div.full.f32``, which may be 2 ulp off; torch divides with IEEE
rounding. Two ulp move ``floor(i * h / out_h)`` to the next source row wherever ``i * h / out_h`` is whole
(nearest resampling), and a normalised value or a layer weight away from the torch path's, so every fp32
division in the kernels goes through :func:`divide` (``tests/test_kernels_compile.py`` checks the PTX).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def divide(a, b):
    """``a / b`` with IEEE rounding: ``div_rn`` in fp32 (``div.rn.f32``); fp64 division is IEEE already."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def min_max_scaled(v, low, spread):
    """``(v - low) / spread``, or 0 where ``spread`` is 0 (a constant map): min-max normalisation as torch's
    :func:`wcam.kernels.resample.normalize_maps` computes it."""
    return tl.where(spread > 0, divide(v - low, tl.where(spread > 0, spread, 1.0)), 0.0)
