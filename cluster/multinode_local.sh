#!/usr/bin/env bash
# A two-node Ray cluster on ONE machine: a head node (custom resource node_a) and a second
# node (node_b) joined to it, each with 1 CPU; `serve deploy cluster/serve_config.multinode.yaml`
# (2 LoRA replicas at 0.6 CPU each, so they can't share a node); wait for RUNNING; check with
# Ray's state API that the two LoRADeployment replicas run on two different nodes; send
# requests across tenants and check 200, x-served-by: lora and identical greedy text per
# (model, prompt), against a plain PEFT reference too; then stop only the two `ray start
# --block` processes this script started (by PID).
#
#   bash cluster/multinode_local.sh               # GCS 6391, dashboard 8276, HTTP 8001
#   NO_REFERENCE=1 bash cluster/multinode_local.sh   # skip the PEFT reference comparison
#   QUICK=1 bash cluster/multinode_local.sh          # shortened (CI): base + 2 tenants, 2 repeats,
#                                                    # no metrics report; same nodes, placement and checks
#
# Ports differ from deploy_local.sh (6390/8275/8000) so both can run on one machine. Every
# other port Ray opens is either random or set below per node, since both nodes share
# 127.0.0.1 (client server 9191: outside the 10002-19999 worker-port range). The HTTP port is the
# config's http_options.port (8001); HTTP_PORT, if set and different, deploys a copy of the config
# with that port. Every fixed port can be set from the environment (the names below).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v ray >/dev/null || { [ -f .venv/bin/activate ] && . .venv/bin/activate; }
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
GCS_PORT=${GCS_PORT:-6391}
DASHBOARD_PORT=${DASHBOARD_PORT:-8276}
CONFIG=${CONFIG:-cluster/serve_config.multinode.yaml}
CONFIG_PORT=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['http_options']['port'])" "$CONFIG")
HTTP_PORT=${HTTP_PORT:-$CONFIG_PORT}
HTTP="http://127.0.0.1:${HTTP_PORT}"
DASH="http://127.0.0.1:${DASHBOARD_PORT}"
METRICS_A=${METRICS_A:-8091}
METRICS_B=${METRICS_B:-8092}
AGENT_PORT_A=${AGENT_PORT_A:-52391}
AGENT_PORT_B=${AGENT_PORT_B:-52392}
CLIENT_PORT=${CLIENT_PORT:-9191}
RUNNING_TIMEOUT=${RUNNING_TIMEOUT:-300}
TEMP_ROOT=$(mktemp -d /tmp/raymn-XXXX)
mkdir -p "$TEMP_ROOT/head" "$TEMP_ROOT/node_b"
if [ "$HTTP_PORT" != "$CONFIG_PORT" ]; then
  python - "$CONFIG" "$HTTP_PORT" "$TEMP_ROOT/serve_config.yaml" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["http_options"]["port"] = int(sys.argv[2])
yaml.safe_dump(cfg, open(sys.argv[3], "w"), sort_keys=False)
EOF
  CONFIG="$TEMP_ROOT/serve_config.yaml"
fi
OBJ_MEM=$((256 * 1024 * 1024))  # small object stores: two nodes share this machine's /dev/shm

HEAD_PID="" NODE_B_PID=""
cleanup() {
  # node B first: a worker node whose head vanished waits for the GCS before giving up.
  local pid
  for pid in $NODE_B_PID $HEAD_PID; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  [ -n "$HEAD_PID$NODE_B_PID" ] && echo "stopped ray nodes: head pid ${HEAD_PID:-none}, node_b pid ${NODE_B_PID:-none}; logs in $TEMP_ROOT"
  HEAD_PID="" NODE_B_PID=""
  # `ray start --block` takes its raylet, GCS, dashboard and workers down with it; report (not
  # kill) anything still running from this script's private temp dir.
  local left
  left=$(pgrep -f -- "$TEMP_ROOT" || true)
  [ -z "$left" ] || echo "warning: processes still using $TEMP_ROOT: $left"
}
trap cleanup EXIT
fail() { cleanup; trap - EXIT; echo "multinode_local: FAILED ($*)"; exit 1; }

# --- head node: node_a ---------------------------------------------------------------------
ray start --head --port="$GCS_PORT" --node-ip-address=127.0.0.1 \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --dashboard-agent-listen-port="$AGENT_PORT_A" --ray-client-server-port="$CLIENT_PORT" --metrics-export-port="$METRICS_A" \
  --num-cpus=1 --num-gpus=0 --resources='{"node_a": 1}' --object-store-memory=$OBJ_MEM \
  --temp-dir="$TEMP_ROOT/head" --disable-usage-stats --block >"$TEMP_ROOT/head.log" 2>&1 &
HEAD_PID=$!
for _ in $(seq 120); do
  curl -sf "$DASH/api/version" >/dev/null && break
  kill -0 "$HEAD_PID" 2>/dev/null || break
  sleep 1
done
curl -sf "$DASH/api/version" >/dev/null || { tail -20 "$TEMP_ROOT/head.log"; fail "head dashboard did not come up"; }
echo "ray head up: pid $HEAD_PID, GCS 127.0.0.1:$GCS_PORT, dashboard $DASH, temp dir $TEMP_ROOT/head"

# --- second node: node_b, joined to the head's GCS, with its own temp dir --------------------
ray start --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
  --dashboard-agent-listen-port="$AGENT_PORT_B" --metrics-export-port="$METRICS_B" \
  --num-cpus=1 --num-gpus=0 --resources='{"node_b": 1}' --object-store-memory=$OBJ_MEM \
  --temp-dir="$TEMP_ROOT/node_b" --disable-usage-stats --block >"$TEMP_ROOT/node_b.log" 2>&1 &
NODE_B_PID=$!
alive_nodes() {
  python - "$DASH" <<'EOF' 2>/dev/null || echo 0
import sys
from ray.util.state import list_nodes
print(len(list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")])))
EOF
}
for _ in $(seq 120); do
  [ "$(alive_nodes)" = 2 ] && break
  kill -0 "$NODE_B_PID" 2>/dev/null || break
  sleep 1
done
[ "$(alive_nodes)" = 2 ] || { tail -20 "$TEMP_ROOT/node_b.log"; fail "second node did not join"; }
echo "ray node_b up: pid $NODE_B_PID, temp dir $TEMP_ROOT/node_b; 2 nodes ALIVE"

# --- deploy and wait --------------------------------------------------------------------------
serve deploy "$CONFIG" -a "$DASH"
status=""
for _ in $(seq "$RUNNING_TIMEOUT"); do
  status=$(serve status -a "$DASH" 2>/dev/null || true)
  if grep -q "status: RUNNING" <<<"$status" && grep -q "status: HEALTHY" <<<"$status" \
      && ! grep -qE "DEPLOYING|UNHEALTHY|DEPLOY_FAILED" <<<"$status"; then break; fi
  grep -q "DEPLOY_FAILED" <<<"$status" && break
  sleep 1
done
echo "$status"
grep -q "status: RUNNING" <<<"$status" && ! grep -qE "DEPLOYING|UNHEALTHY|DEPLOY_FAILED" <<<"$status" \
  || fail "app did not reach RUNNING/HEALTHY within ${RUNNING_TIMEOUT}s; serve status above"

# --- placement + requests (+ reference) -------------------------------------------------------
check_args=(--dashboard "$DASH" --http "$HTTP" --config "$CONFIG")
if [ -n "${QUICK:-}" ]; then
  check_args+=(--models 2 --repeats 2)
else
  check_args+=(--metrics "127.0.0.1:$METRICS_A,127.0.0.1:$METRICS_B")
fi
[ -n "${NO_REFERENCE:-}" ] && check_args+=(--no-reference)
python cluster/multinode_check.py "${check_args[@]}" || fail "checks failed (see ERROR lines)"
cleanup; trap - EXIT
echo "multinode_local: OK"
