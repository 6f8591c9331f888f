#!/usr/bin/env bash
# A two-node Ray cluster on one machine: a head (1 CPU) and a "GPU" worker whose custom resource
# fake_gpu stands in for a GPU, with token authentication on. For trying `cmflow submit` and the
# scheduler locally; stages with `resources: {custom: {fake_gpu: 1}}` land on the worker only.
#
#   cluster/local-two-node.sh start            # prints the addresses and the token file
#   cmflow submit pipelines/tiny.yaml --address http://127.0.0.1:8266 --token-file /tmp/cmflow-two-node/token --wait
#   cmflow scheduler start --address 127.0.0.1:6390 --root ./cmflow-artifacts   (with RAY_AUTH_MODE=token set)
#   cluster/local-two-node.sh stop             # kills exactly the processes this script started
#
# It never runs `ray stop` (that kills every Ray process on the machine, other users' included).
# Environment: RAY (ray executable), GCS_PORT (6390), DASHBOARD_PORT (8266), STATE_DIR (/tmp/cmflow-two-node).
set -euo pipefail

cmd="${1:-start}"
state="${STATE_DIR:-/tmp/cmflow-two-node}"
ray="${RAY:-ray}"
python="${PYTHON:-python3}"
gcs_port="${GCS_PORT:-6390}"
dash_port="${DASHBOARD_PORT:-8266}"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$state/token"
export RAY_USAGE_STATS_ENABLED=0

wait_for_port() {  # wait_for_port PORT SECONDS
  "$python" - "$1" "$2" <<'PY'
import socket, sys, time
port, deadline = int(sys.argv[1]), time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"nothing listens on 127.0.0.1:{port}; see the *.log files in the state dir")
PY
}

start_node() {  # start_node NAME ARGS... : `ray start --block` in its own process group, PID saved
  local name="$1"; shift
  setsid "$ray" start "$@" --block >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
}

case "$cmd" in
  start)
    mkdir -p "$state"
    [ -s "$state/token" ] || "$python" -c 'import secrets; print(secrets.token_hex(32))' >"$state/token"
    chmod 600 "$state/token"
    start_node head --head --node-ip-address=127.0.0.1 --port="$gcs_port" \
      --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" --num-cpus=1 --temp-dir="$state/ray"
    wait_for_port "$dash_port" 90
    start_node gpu-worker --address="127.0.0.1:$gcs_port" --node-ip-address=127.0.0.1 --num-cpus=2 \
      --resources='{"fake_gpu": 1}'
    echo "job server:  http://127.0.0.1:$dash_port   (cmflow submit/logs/stop --address)"
    echo "GCS address: 127.0.0.1:$gcs_port           (cmflow scheduler --address)"
    echo "token file:  $state/token                  (--token-file, or RAY_AUTH_TOKEN_PATH)"
    ;;
  stop)
    for name in gpu-worker head; do
      if [ -f "$state/$name.pid" ]; then
        pid="$(cat "$state/$name.pid")"
        kill -TERM -- "-$pid" 2>/dev/null || true   # the whole process group of that `ray start --block`
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$state/$name.pid"
      fi
    done
    echo "stopped the two nodes under $state"
    ;;
  status)
    for name in head gpu-worker; do
      if [ -f "$state/$name.pid" ] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then
        echo "$name: running (pid $(cat "$state/$name.pid"))"
      else
        echo "$name: not running"
      fi
    done
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
