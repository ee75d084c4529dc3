#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with prefopt and its test tools,
# and the tiny offline demo model in demo/tiny-llama. Safe to run again (it skips what is done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4"
  else
    # No GPU: a CPU build. On our CI image this version's CPU wheel is on disk; elsewhere set
    # PREFOPT_TORCH to e.g. "torch --index-url https://download.pytorch.org/whl/cpu".
    python -m pip install -q ${PREFOPT_TORCH:-torch==2.13.0}
  fi
fi
python -m pip install -q -e ".[dev,fast,deepspeed]"

if [ ! -f demo/tiny-llama/model.safetensors ]; then
  python scripts/demo_assets.py model demo/tiny-llama --data data/demo
fi
echo "prefopt set up: $(.venv/bin/prefopt --version)"
