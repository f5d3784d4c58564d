#!/usr/bin/env bash
# lm-eval (--model local-completions) against our server vs lm-eval's own hf model with PEFT, on a
# small task from local files (benchmarks/lm_eval_check.py says what it checks).
#
#   bash benchmarks/lm_eval_check.sh [--models base,tenant-0,tenant-1] [--tol 1e-3]
#
# lm-eval lives in its own venv ($LMEVAL_VENV, default ~/.cache/serve_app/lmeval-venv, created on
# first run), never in the server's. The server side runs with $PYTHON (default: python, the repo's venv).
set -euo pipefail
cd "$(dirname "$0")/.."
LMEVAL_VENV=${LMEVAL_VENV:-$HOME/.cache/serve_app/lmeval-venv}
if [ ! -x "$LMEVAL_VENV/bin/lm_eval" ]; then
  python3 -m venv "$LMEVAL_VENV"
  "$LMEVAL_VENV/bin/pip" install -q torch==2.13.0   # the CPU wheel first, as the repo's README does
  "$LMEVAL_VENV/bin/pip" install -q "lm-eval[hf,api]==0.4.13" torch==2.13.0 peft
fi
RAY_AUTH_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m benchmarks.lm_eval_check \
  --lmeval-python "$LMEVAL_VENV/bin/python" "$@"
