"""Fused, batched Triton kernels for the CAM maths, one op per module (kernel, host launcher, entry point).

Each entry point takes and returns what its torch counterpart in :mod:`wcam.kernels` does, so the dispatch in
:mod:`wcam.kernels.dispatch` can swap them. A launch covers every image and every layer at once: per-layer
tensors are read where they live, through a small table of pointers, strides and shapes, so the number of
launches per batch does not grow with the number of layers. Sizes that change with the model, the batch or
the frame are not specialised on, so a new layer set or frame size reuses the compiled kernels. On a CPU they run under ``TRITON_INTERPRET=1``
(for tests; far too slow for real work).
"""
