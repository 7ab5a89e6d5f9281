#!/usr/bin/env bash
# A GPU session's checks in one call of the device tool, most important first (its time is 15 minutes in all):
#
#   here:   bash bench/gpu_wheels.sh
#   device: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# 1. `wcam bench --device cuda` (issue 6's table on the GPU: the floor, wcam eager with the Triton and the torch
#    kernels, folded, compiled at batch 8, the peers), under BENCH_S seconds (default 360); its JSON is
#    rewritten after each case, so a run cut short keeps what it timed;
# 2. `bench/gpu.py`'s sections check (the Triton kernels against the torch path on the GPU), kernels (the CAM
#    maths' timing and bandwidth), e2e and video, under GPU_S seconds (default 170). The compiled backend is
#    in step 1; the tiling sweep (profile) chose the kernels' tiles on an H100 already.
# Everything is written under $OUT (the device tool's folder that comes back): logs, JSON and markdown.
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 --version
  python3 -m pip list 2>/dev/null | grep -i -E '^(torch|torchvision|triton|onnxruntime|av|grad-cam|torchcam|captum) '; } \
    > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
timeout "${BENCH_S:-360}" python3 -m wcam bench --device cuda --json "$out/wcam-bench-cuda.json" 2>&1 | tee "$out/bench.log"
python3 bench/gpu.py --out "$out" --budget "${GPU_S:-170}" --only check kernels e2e video 2>&1 | tee "$out/gpu.log"
