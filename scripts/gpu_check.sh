#!/usr/bin/env bash
# The GPU check in one device call. On the lent GPU machine (scripts/gpu_machine.txt: no package registry, no trl,
# bitsandbytes, datasets or pydantic) it installs the wheels of .whl/ (scripts/gpu_wheels.sh, run here first; the
# call carries .whl) into a target folder, prints the versions it runs with, then runs each check under its own time
# limit, all within about 9 minutes: bench_dora's GPU rows first (the unquantized bf16-autocast row is the one
# that misses its target on CPU: issue 26), then the GPU-marked tests (CUDA autocast parity, merge verification on
# the GPU), the ~0.5B NF4 SFT -> DPO -> merge chain and the memory plan against torch.cuda.max_memory_allocated.
# Every figure goes to $OUT/gpu_check.json, with $OUT/summary.md and $OUT/gpu_check.log (scripts/gpu_check.py).
#     bash scripts/gpu_wheels.sh            # here, once: .whl/ (about 47 MiB)
#     bash scripts/gpu_check.sh             # there, e.g. run(command="bash scripts/gpu_check.sh", carry=[".whl"],
#                                           #                timeout_s=600)
#     bash scripts/gpu_check.sh --rehearse  # here, on CPU, before any device minute: a virtual environment in
#                                           # .rehearse/ (built once per spec) with the GPU machine's versions, the
#                                           # same wheels installed the same way; the steps at CPU sizes, CUDA-only
#                                           # ones skipped
#                                           # (REHEARSE_PYTHON, PREFOPT_TORCH: the interpreter and its CPU torch;
#                                           # default python3 and setup.sh's torch==2.13.0)
#     bash scripts/gpu_check.sh distributed # there: the shipped accelerate configs under accelerate launch
#                                           # (tests/test_gpu_distributed.py; needs deepspeed, which .whl/ lacks)
# Not part of CI. Exit status 0 only when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS INSTALL_S=0
BUDGET=${GPU_CHECK_BUDGET:-540}  # the whole command: one device call of at most 10 minutes, with a minute to spare
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 WANDB_MODE=disabled \
  TOKENIZERS_PARALLELISM=false

# pip install --no-index --no-deps --target: no resolver, no registry; PYTHONPATH puts the folder before the
# interpreter's own site-packages, so a shipped wheel (peft) shadows the version already there
install_wheels() {  # $1 python, $2 wheel folder, $3 target folder
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if ! ls "$2"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $2/ (run scripts/gpu_wheels.sh and carry .whl): using what $1 has"; return 0
  fi
  local t=$SECONDS
  rm -rf "$3"
  "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$3" "$2"/*.whl \
    || { echo "gpu_check: installing $2/*.whl failed"; exit 2; }
  INSTALL_S=$((SECONDS - t))
  echo "gpu_check: installed $(ls "$2"/*.whl | wc -l) wheels from $2/ into $3 in ${INSTALL_S} s"
  export PYTHONPATH="$3:$PYTHONPATH" GPU_CHECK_SITE="$3"
}

if [ "${1:-}" = --rehearse ]; then
  # The GPU machine's versions where they are on record (scripts/gpu_machine.txt), in a CPU virtual environment.
  # torch: the GPU machine has 2.11.0+cu130; PyPI's Linux torch wheels are CUDA builds of several GB and only PyPI is
  # reachable here, so the rehearsal takes the CPU build on hand (setup.sh's), for the Python that build is for.
  RPY=${REHEARSE_PYTHON:-python3}
  TORCH=${PREFOPT_TORCH:-torch==2.13.0}
  R=.rehearse
  OUT=${OUT:-$R/out}
  pinned() { grep -i "^$1==" scripts/gpu_machine.txt | head -1; }
  BASE=(transformers accelerate huggingface-hub tokenizers safetensors numpy peft scipy pandas pyarrow xxhash fsspec
        requests tqdm psutil jinja2 packaging filelock pyyaml rich click matplotlib pytest hypothesis)
  stamp="$($RPY -V 2>&1) $TORCH ${BASE[*]} $(md5sum scripts/gpu_machine.txt | cut -c1-12)"
  if [ "$(cat $R/venv/stamp 2>/dev/null)" != "$stamp" ]; then
    t=$SECONDS
    rm -rf $R/venv && mkdir -p $R && "$RPY" -m venv $R/venv || exit 2
    VPY=$R/venv/bin/python
    specs=()
    for name in "${BASE[@]}"; do
      spec=$(pinned "$name")
      if [ -n "$spec" ] && ! $VPY -m pip index versions "$name" 2>/dev/null | grep -q "[ ,]${spec#*==}\(,\|$\)"; then
        echo "gpu_check --rehearse: $spec (the GPU machine's) is not installable for $($VPY -V): the newest instead"
        spec=""
      fi
      specs+=("${spec:-$name}")
    done
    echo "gpu_check --rehearse: $RPY ($($VPY -V)), $TORCH, ${specs[*]}"
    if ! $VPY -m pip install -q "$TORCH" "${specs[@]}" >$R/pip.log 2>&1; then
      grep -v "is ignored: it is neither" $R/pip.log; echo "gpu_check --rehearse: pip install failed (above)"; exit 2
    fi
    # what pip brought in beyond the machine's list (pydantic through typer, say) would hide a missing wheel
    absent=$($VPY scripts/gpu_wheels.py absent)
    if [ -n "$absent" ]; then
      echo "gpu_check --rehearse: removing what the GPU machine does not have:" $absent
      $VPY -m pip uninstall -q -y $absent
    fi
    echo "$stamp" > $R/venv/stamp
    echo "gpu_check --rehearse: virtual environment built in $((SECONDS - t)) s"
  fi
  VPY=$R/venv/bin/python
  bash scripts/gpu_wheels.sh || exit 2  # .whl/ as the GPU machine gets it: the list, the sizes, the limit
  PYVER=$($VPY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  WHL=.whl
  if [ "$PYVER" != 3.12 ]; then  # the same names and versions, built for this Python where a wheel is specific
    echo "gpu_check --rehearse: Python $PYVER here (3.12 there): the same wheels for $PYVER into $R/whl"
    bash scripts/gpu_wheels.sh --python "$PYVER" --dest $R/whl >/dev/null || exit 2
    WHL=$R/whl
  fi
  install_wheels "$VPY" "$WHL" "$PWD/$R/site"
  export CUDA_VISIBLE_DEVICES=""
  exec $VPY scripts/gpu_check.py run --cpu --out "$OUT" --budget "${REHEARSE_BUDGET:-1500}" --install-s "$INSTALL_S"
fi

if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
nvidia-smi -L || { echo "gpu_check: no GPU (on CPU: bash scripts/gpu_check.sh --rehearse)"; exit 2; }
install_wheels "$PY" "${GPU_CHECK_WHEELS:-.whl}" /tmp/prefopt-site
if [ "${1:-}" = distributed ]; then
  timeout 540 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_distributed.py 2>&1 \
    | tee "$OUT/gpu_distributed.log"
  exit
fi
exec "$PY" scripts/gpu_check.py run --out "$OUT" --budget $((BUDGET - (SECONDS - T0))) --install-s "$INSTALL_S"
