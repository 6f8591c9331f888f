#!/usr/bin/env bash
# The CIFAR-10 rehearsal (pipelines/cifar10-rehearsal.yaml) on this machine, with everything it talks to
# started on loopback: an S3 endpoint (moto's server) holding the inputs and the artifacts, an MLflow server
# (SQLite, artifacts proxied to that S3), and cmflow's private local Ray.
#
#   bash scripts/rehearsal.sh [cmflow run options, e.g. --set stages.teacher.params.steps=40]
#   GPUS=1 bash scripts/rehearsal.sh     # teacher, distill and evaluate on GPU workers (bench/gpu_check.sh)
#
# Writes the inputs first (scripts/rehearsal_inputs.py: 50 000 CIFAR-shaped images as the real python
# tarball; Inception-v3 in the FID weights layout with random weights), then runs the pipeline, prints each
# stage's time and stops what it started (by PID). Runs itself inside a loopback-only network namespace.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
if [ -z "${CMFLOW_IN_NETNS:-}" ]; then
  CMFLOW_IN_NETNS=1 exec bash .ci/netns bash "$0" "$@"
fi
py="${PYTHON:-$here/.venv/bin/python}"
work="${WORK:-$(mktemp -d /tmp/cmflow-rehearsal.XXXXXX)}"
mkdir -p "$work"
port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { "$py" - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit(f"{sys.argv[1]} did not come up")
PY
}
s3_port=$(port); mlflow_port=$(port)
export AWS_ACCESS_KEY_ID=rehearsal AWS_SECRET_ACCESS_KEY=rehearsal AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$s3_port"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$mlflow_port" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

"$py" -m moto.server -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
cleanup() { kill "${mlflow_pid:-}" "$moto_pid" 2>/dev/null || true; }
trap cleanup EXIT
wait_for "$AWS_ENDPOINT_URL"

"$py" -c 'import s3fs; fs = s3fs.S3FileSystem(); [fs.mkdir(b) for b in ("cmflow-rehearsal", "cmflow-mlflow")]'
"$py" scripts/rehearsal_inputs.py s3://cmflow-rehearsal --per-batch "${PER_BATCH:-10000}"

"$py" -m mlflow server --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
  --backend-store-uri "sqlite:///$work/mlflow.db" --artifacts-destination s3://cmflow-mlflow/artifacts \
  >"$work/mlflow.log" 2>&1 &
mlflow_pid=$!
wait_for "$MLFLOW_TRACKING_URI/health"

gpu=()
if [ "${GPUS:-0}" != 0 ]; then
  gpu=(--set stages.teacher.resources.gpus=1 --set stages.distill.resources.gpus=1 --set stages.evaluate.resources.gpus=1)
fi
start=$SECONDS
"$py" -m cmflow.cli.main run pipelines/cifar10-rehearsal.yaml "${gpu[@]}" "$@"
echo "rehearsal: $((SECONDS - start)) s end to end (inputs written before); logs and stores under $work"
