#!/usr/bin/env bash
# Build the gpu-target repository (ONNX export + TensorRT UNet plan) unless an up-to-date
# one is there. Runs in the builder image with a GPU.
#   CHECKPOINT  checkpoint folder (default /weights)
#   OUT         repository to write (default /build/model_repository_gpu)
#   FORCE=1     rebuild even when the plan checks out
set -euo pipefail
ckpt="${CHECKPOINT:-/weights}"
out="${OUT:-/build/model_repository_gpu}"
if [ "${FORCE:-0}" != "1" ] && [ -f "${out}/cxr_sr/config.pbtxt" ] \
   && python3 -m cxr_sr.builders.trt check "${out}"; then
  echo "repository ${out} is built and its plan matches this TensorRT: nothing to do"
  exit 0
fi
python3 -m cxr_sr.builders.build --checkpoint "${ckpt}" --target gpu --engine build \
  --onnx-dir /build/onnx --out "${out}" "$@"
python3 -m cxr_sr.builders.trt check "${out}"
