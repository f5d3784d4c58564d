#!/usr/bin/env bash
# `serve deploy serve_config.yaml` against a Ray cluster started with `ray start --head`,
# all on this machine: start a private head, deploy, wait for RUNNING, send requests, check
# them, then stop only the head this script started (by its PID).
#
#   bash cluster/deploy_local.sh            # uses ports 6390 (GCS), 8275 (dashboard), 8000 (HTTP)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v ray >/dev/null || { [ -f .venv/bin/activate ] && . .venv/bin/activate; }
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8275}
HTTP=${HTTP:-http://127.0.0.1:8000}
DASH="http://127.0.0.1:${DASHBOARD_PORT}"
TEMP_DIR=$(mktemp -d /tmp/rayd-XXXX)

ray start --head --port="$GCS_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --num-cpus=2 --temp-dir="$TEMP_DIR" --disable-usage-stats --block >"$TEMP_DIR/head.log" 2>&1 &
HEAD_PID=$!
cleanup() { kill "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 120); do
  curl -sf "$DASH/api/version" >/dev/null && break
  kill -0 "$HEAD_PID" 2>/dev/null || break
  sleep 1
done
curl -sf "$DASH/api/version" >/dev/null || { echo "dashboard did not come up"; tail -20 "$TEMP_DIR/head.log"; exit 1; }
echo "ray head up (pid $HEAD_PID, dashboard $DASH)"

serve deploy serve_config.yaml -a "$DASH"
for _ in $(seq 300); do
  status=$(serve status -a "$DASH" 2>/dev/null || true)
  if grep -q "status: RUNNING" <<<"$status" && ! grep -qE "DEPLOYING|UNHEALTHY" <<<"$status"; then break; fi
  sleep 1
done
serve status -a "$DASH"
grep -q "status: RUNNING" <<<"$(serve status -a "$DASH")" || { echo "app did not reach RUNNING"; exit 1; }

fail=0
for model in base tenant-0 tenant-5; do
  out=$(curl -s -D "$TEMP_DIR/h" "$HTTP/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"prompt\": \"the quick brown\", \"max_tokens\": 8, \"temperature\": 0}")
  code=$(head -1 "$TEMP_DIR/h" | awk '{print $2}')
  served=$(grep -i '^x-served-by' "$TEMP_DIR/h" | tr -d '\r' | awk '{print $2}')
  echo "$model -> HTTP $code, x-served-by: $served, $out"
  [ "$code" = 200 ] && [ "$served" = lora ] && grep -q '"finish_reason":"length"' <<<"$out" || fail=1
done
[ "$fail" = 0 ] && echo "deploy_local: OK" || { echo "deploy_local: FAILED"; exit 1; }
