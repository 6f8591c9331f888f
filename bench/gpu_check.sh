#!/usr/bin/env bash
# One GPU check, < 12 minutes on a CUDA machine:
#   1. CUDA is visible inside a Ray worker (a num_gpus=1 task sees the device and CUDA_VISIBLE_DEVICES);
#   2. the CIFAR-10 CD training step at the paper architecture in bf16: img/s and MFU;
#   3. the tiny pipeline with its teacher and distill stages on the GPU;
#   4. the CIFAR-10 rehearsal (pipelines/cifar10-rehearsal.yaml) with GPU workers for teacher, distill and
#      evaluate, 10 000 images, against a loopback S3 and MLflow server (scripts/rehearsal.sh).
# Where packages are missing (a bare GPU box without internet), carry wheels in .whl/ (see docs/benchmarks.md).
# Usage: bash bench/gpu_check.sh        (prints a table last; exit 1 if a check failed)
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && py="${PYTHON:-.venv/bin/python}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$here:${PYTHONPATH:-}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu_check}"; mkdir -p "$out"
declare -a results
check() { local name="$1"; shift; local t0=$SECONDS
  if timeout "${CHECK_TIMEOUT:-240}" "$@" >"$out/$name.log" 2>&1; then results+=("| $name | ok | $((SECONDS - t0)) s |")
  else results+=("| $name | FAILED (see $out/$name.log) | $((SECONDS - t0)) s |"); fi
  tail -n 14 "$out/$name.log"; }

check ray-cuda "$py" - <<'PY'
import os, ray, torch
ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False, _node_ip_address="127.0.0.1")
@ray.remote(num_gpus=1)
def probe():
    import torch
    return torch.cuda.is_available(), os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.get_device_name(0)
ok, visible, name = ray.get(probe.remote(), timeout=120)
print(f"cuda in Ray worker: {ok}, CUDA_VISIBLE_DEVICES={visible}, device={name}")
assert ok and visible not in (None, "")
PY
check cd-step-cifar10-bf16 "$py" bench/bench_cd_step.py --preset cifar10 --resolution 32 --channels 3 --batch 256 --bf16 --repeats 20
check tiny-pipeline-gpu "$py" -m cmflow.cli.main run pipelines/tiny.yaml --set storage.root="$out/store" \
  --set stages.teacher.resources.gpus=1 --set stages.distill.resources.gpus=1 --set tracking.enabled=false
CHECK_TIMEOUT=420 check rehearsal-gpu env GPUS=1 PER_BATCH=1000 PYTHON="$py" bash scripts/rehearsal.sh

printf '\n| check | result | time |\n|---|---|---|\n'
printf '%s\n' "${results[@]}"
printf '%s\n' "${results[@]}" | grep -q FAILED && exit 1 || exit 0
