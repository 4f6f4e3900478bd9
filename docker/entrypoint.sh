#!/usr/bin/env bash
# Refuse a TensorRT plan built by another TensorRT, then serve through the cxr_sr wrapper:
# the NGC tritonserver under a watchdog that sends one small real inference through cxr_sr
# every PROBE_INTERVAL seconds and, when the pipeline is broken (a dead Python stub keeps
# Triton's ready endpoints at 200), stops the server and exits 1 so that Docker / Kubernetes
# restart the container. Shutdown takes seconds (tritonserver --exit-timeout-secs, then SIGKILL
# of its process group, stubs included).
#   MODEL_REPOSITORY    repository to serve (default /build/model_repository_gpu)
#   TRITON_HOST         address to bind inside the container (default 0.0.0.0: published
#                       ports need it); beyond loopback the wrapper requires an admin key:
#   CXR_ADMIN_KEY_FILE  file holding it (compose: the secret /run/secrets/cxr_admin_key), or
#   CXR_ADMIN_KEY       the key itself
#   CXR_GRPC_TLS_CERT, CXR_GRPC_TLS_KEY [, CXR_GRPC_TLS_CA]   gRPC over TLS (PEM paths)
#   PROBE_INTERVAL, PROBE_FAILURES   watchdog settings (default 10 s, 3 in a row)
#   extra arguments     passed to the wrapper (python3 -m cxr_sr.builders.serve --help);
#                       after `--`, to tritonserver as they are
set -euo pipefail
repo="${MODEL_REPOSITORY:-/build/model_repository_gpu}"
if [ ! -f "${repo}/cxr_sr/config.pbtxt" ]; then
  echo "error: ${repo} holds no cxr_sr model; run the build-engine service first" >&2
  echo "       (docker compose -f docker/docker-compose.yml run --rm build-engine)" >&2
  exit 1
fi
python3 -m cxr_sr.builders.trt check "${repo}"
exec python3 -m cxr_sr.builders.serve \
  --tritonserver /opt/tritonserver/bin/tritonserver \
  --repository "${repo}" \
  --host "${TRITON_HOST:-0.0.0.0}" \
  --http-port 8000 --grpc-port 8001 --metrics-port 8002 \
  --probe-interval "${PROBE_INTERVAL:-10}" \
  --probe-failures "${PROBE_FAILURES:-3}" \
  --on-failure exit \
  "$@"
