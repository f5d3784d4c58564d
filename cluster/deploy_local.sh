#!/usr/bin/env bash
# `serve deploy serve_config.yaml` against a Ray cluster started with `ray start --head`,
# all on this machine: start a private head, deploy, wait for RUNNING, ask the app which models
# it serves (GET /v1/models), send a greedy chat request to the base and to two of the listed
# adapters, check them, then stop only the head this script started (by its PID).
#
#   bash cluster/deploy_local.sh            # uses ports 6390 (GCS), 8275 (dashboard), 8000 (HTTP)
#   CONFIG=other.yaml HTTP_PORT=8010 GCS_PORT=6392 DASHBOARD_PORT=8277 bash cluster/deploy_local.sh
#
# Whatever demo the config serves (serve_config.yaml: SmolLM2 with the french / pirate / json
# tenants; base_model: demo: tenant-0..7), the models come from the app itself. On a fresh
# cache the SmolLM2 demo converts the model and trains its tenants first (a few minutes on 2
# cores; RUNNING_TIMEOUT, default 900 s); later runs take well under a minute.
# HTTP_PORT, if set and different from the config's http_options.port, deploys a copy of the
# config with that port (in this script's temp dir). The other ports Ray opens on this machine
# are set below (DASHBOARD_AGENT_PORT, CLIENT_PORT) or random.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v ray >/dev/null || { [ -f .venv/bin/activate ] && . .venv/bin/activate; }
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8275}
DASHBOARD_AGENT_PORT=${DASHBOARD_AGENT_PORT:-52390}
CLIENT_PORT=${CLIENT_PORT:-9190}
CONFIG=${CONFIG:-serve_config.yaml}
RUNNING_TIMEOUT=${RUNNING_TIMEOUT:-900}
DASH="http://127.0.0.1:${DASHBOARD_PORT}"
TEMP_DIR=$(mktemp -d /tmp/rayd-XXXX)

CONFIG_PORT=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['http_options']['port'])" "$CONFIG")
HTTP_PORT=${HTTP_PORT:-$CONFIG_PORT}
if [ "$HTTP_PORT" != "$CONFIG_PORT" ]; then
  python - "$CONFIG" "$HTTP_PORT" "$TEMP_DIR/serve_config.yaml" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["http_options"]["port"] = int(sys.argv[2])
yaml.safe_dump(cfg, open(sys.argv[3], "w"), sort_keys=False)
EOF
  CONFIG="$TEMP_DIR/serve_config.yaml"
fi
HTTP="http://127.0.0.1:${HTTP_PORT}"

ray start --head --port="$GCS_PORT" --node-ip-address=127.0.0.1 \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --num-cpus=2 --temp-dir="$TEMP_DIR" --disable-usage-stats --block >"$TEMP_DIR/head.log" 2>&1 &
HEAD_PID=$!
cleanup() {
  [ -n "$HEAD_PID" ] || return 0
  kill "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true
  echo "stopped ray head pid $HEAD_PID; logs in $TEMP_DIR"
  HEAD_PID=""
  # `ray start --block` takes its raylet, GCS, dashboard and workers down with it; report (not
  # kill) anything still running from this script's private temp dir.
  local left
  left=$(pgrep -f -- "$TEMP_DIR" || true)
  [ -z "$left" ] || echo "warning: processes still using $TEMP_DIR: $left"
}
trap cleanup EXIT
fail() { echo "deploy_local: FAILED ($*)"; exit 1; }

for _ in $(seq 120); do
  curl -sf "$DASH/api/version" >/dev/null && break
  kill -0 "$HEAD_PID" 2>/dev/null || break
  sleep 1
done
curl -sf "$DASH/api/version" >/dev/null || { tail -20 "$TEMP_DIR/head.log"; fail "dashboard did not come up"; }
echo "ray head up (pid $HEAD_PID, dashboard $DASH, temp dir $TEMP_DIR)"

serve deploy "$CONFIG" -a "$DASH"
echo "waiting up to ${RUNNING_TIMEOUT}s for RUNNING (a fresh SmolLM2 demo cache trains its tenants first)"
status="" last="" t0=$SECONDS next=60
while [ $((SECONDS - t0)) -lt "$RUNNING_TIMEOUT" ]; do
  status=$(serve status -a "$DASH" 2>/dev/null || true)
  if grep -q "status: RUNNING" <<<"$status" && ! grep -qE "DEPLOYING|UNHEALTHY|DEPLOY_FAILED" <<<"$status"; then break; fi
  grep -q "DEPLOY_FAILED" <<<"$status" && break
  app=$(grep -m1 -oE "status: [A-Z_]+" <<<"$status" || true)
  waited=$((SECONDS - t0))
  if [ "$app" != "$last" ] || [ "$waited" -ge "$next" ]; then
    echo "  ${waited}s: app ${app:-not started}"; last=$app; next=$((waited + 60))
  fi
  sleep 1
done
echo "$status"
grep -q "status: RUNNING" <<<"$status" && ! grep -qE "DEPLOYING|UNHEALTHY|DEPLOY_FAILED" <<<"$status" \
  || fail "app did not reach RUNNING within ${RUNNING_TIMEOUT}s; serve status above, logs in $TEMP_DIR/session_latest/logs/serve"

# Which models does the app serve? The base (no parent) and its adapters (parent = the base), from
# the app itself; then one greedy chat request each for the base and the first two adapters:
# HTTP 200, x-served-by: lora, a non-empty answer, and not every adapter answering exactly as the base.
python - "$HTTP" <<'EOF' || fail "requests failed (see ERROR lines)"
import json, sys, time, urllib.error, urllib.request

http = sys.argv[1]

def call(path, body=None):
    req = urllib.request.Request(http + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers.get("x-served-by"), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-served-by"), e.read().decode(errors="replace")[:300]

for _ in range(60):  # RUNNING: the proxy may lag a moment behind
    try:
        code, _, models = call("/v1/models")
        if code == 200:
            break
    except OSError:
        pass
    time.sleep(1)
else:
    sys.exit(print(f"ERROR: GET {http}/v1/models never answered 200"))
cards = models["data"]
bases = [m["id"] for m in cards if not m.get("parent")]
adapters = sorted(m["id"] for m in cards if m.get("parent"))
print(f"GET /v1/models: base {bases}, {len(adapters)} adapters {adapters}")
if len(bases) != 1 or len(adapters) < 2:
    sys.exit(print(f"ERROR: expected one base model and at least two adapters, got {cards}"))

errors, answers = [], {}
for model in [bases[0], *adapters[:2]]:
    body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}
    code, served, out = call("/v1/chat/completions", body)
    text = out["choices"][0]["message"]["content"] if code == 200 else None
    print(f"{model} -> HTTP {code}, x-served-by: {served}, {text if code == 200 else out!r}")
    if code != 200 or served != "lora" or not text or out["choices"][0]["finish_reason"] not in ("stop", "length"):
        errors.append(f"{model}: HTTP {code}, x-served-by {served}, {out}")
    answers[model] = text
if not errors and all(answers[a] == answers[bases[0]] for a in adapters[:2]):
    errors.append(f"both adapters answered exactly as the base ({answers[bases[0]]!r}): are adapters applied?")
for e in errors:
    print("ERROR:", e)
sys.exit(1 if errors else 0)
EOF
cleanup; trap - EXIT
echo "deploy_local: OK"
