#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with prefopt and its test tools,
# and the tiny offline demo model in demo/tiny-llama. Safe to run again (it skips what is done).
# One line per step; pip's own output goes to .venv/setup.log (its tail is shown when a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=.venv/setup.log

step() {  # step "what" command...: one line, the command's output in the log
  local what=$1; shift
  printf 'setup: %s ... ' "$what"
  local t0=$SECONDS
  if "$@" >>"$LOG" 2>&1; then
    echo "done ($((SECONDS - t0)) s)"
  else
    local rc=$?
    echo "FAILED (exit $rc); the last lines of $LOG:"
    tail -n 25 "$LOG"
    exit "$rc"
  fi
}

if [ ! -x .venv/bin/python ]; then
  printf 'setup: virtual environment .venv ... '
  "$PY" -m venv .venv && echo done
fi
: >"$LOG"
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
step "pip up to date" python -m pip install -q --upgrade pip

if python -c "import torch" 2>/dev/null; then
  echo "setup: torch $(python -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  step "torch (CUDA build)" python -m pip install -q "torch>=2.4"
else
  # No GPU: a CPU build. On our CI image this version's CPU wheel is on disk; elsewhere set
  # PREFOPT_TORCH to e.g. "torch --index-url https://download.pytorch.org/whl/cpu".
  # shellcheck disable=SC2086
  step "torch (CPU build: ${PREFOPT_TORCH:-torch==2.13.0})" python -m pip install -q ${PREFOPT_TORCH:-torch==2.13.0}
fi
step "prefopt and its dev, fast and deepspeed extras" python -m pip install -q -e ".[dev,fast,deepspeed]"

if [ ! -f demo/tiny-llama/model.safetensors ]; then
  step "demo model demo/tiny-llama and data/demo" python scripts/demo_assets.py model demo/tiny-llama --data data/demo
fi
echo "setup: ready: $(.venv/bin/prefopt --version)"
