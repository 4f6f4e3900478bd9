#!/usr/bin/env bash
# Refuse a TensorRT plan built by another TensorRT, then become tritonserver.
#   MODEL_REPOSITORY  repository to serve (default /build/model_repository_gpu)
#   extra arguments   passed to tritonserver as they are
set -euo pipefail
repo="${MODEL_REPOSITORY:-/build/model_repository_gpu}"
if [ ! -f "${repo}/cxr_sr/config.pbtxt" ]; then
  echo "error: ${repo} holds no cxr_sr model; run the build-engine service first" >&2
  echo "       (docker compose -f docker/docker-compose.yml run --rm build-engine)" >&2
  exit 1
fi
python3 -m cxr_sr.builders.trt check "${repo}"
exec tritonserver \
  --model-repository="${repo}" \
  --model-control-mode=none \
  --exit-on-error=true \
  --strict-readiness=true \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  "$@"
