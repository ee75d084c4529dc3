#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels the lent GPU machine lacks for scripts/gpu_check.sh: that machine
# (scripts/gpu_machine.txt: Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, ...) reaches no package
# registry, so what prefopt needs beyond its image travels with the working tree (64 MiB a call, all together).
# Prints each wheel, its size and why it is taken; checks every shipped wheel's own requirements against the
# shipped set and the machine's list; stops (exit 1) above the size limit or on a missing requirement.
#     bash scripts/gpu_wheels.sh                                 # .whl/: CPython 3.12, manylinux x86_64
#     bash scripts/gpu_wheels.sh --python 3.11 --dest DIR        # the same names and versions for another Python
#                                                                # (the CPU rehearsal: gpu_check.sh --rehearse)
# Not taken: wandb and lm-eval (a run with tracking off and no eval section imports neither:
# tests/test_lazy_imports.py), deepspeed (only `gpu_check.sh distributed`), rensa (optional; datasketch is the
# fallback), transformers and accelerate (the machine's 5.17 / 1.15 pass the rehearsal).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12 DEST=.whl LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-60}
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER=$2; shift 2;;
    --dest) DEST=$2; shift 2;;
    --limit-mib) LIMIT_MIB=$2; shift 2;;
    *) echo "gpu_wheels: unknown argument $1 (see the header of $0)" >&2; exit 2;;
  esac
done
PY=${PYTHON:-python3}

# name==version|why. One version of each: two stop the install there.
WHEELS=(
  "bitsandbytes==0.50.2|NF4/int8 bases: the NF4 tests, bench_dora, the memory plan's NF4 rows (>=0.48,<0.51)"
  "trl==1.16.0|the stage trainers (pyproject pins >=1.16,<1.17)"
  "peft==0.21.2|the adapter; pyproject pins >=0.21,<0.22, the version there is not on record: this one shadows it"
  "datasets==5.2.0|TRL's trainers and prefopt's data step take datasets.Dataset"
  "dill==0.4.1|needed by datasets (<0.4.2)"
  "multiprocess==0.70.19|needed by datasets (<0.70.20)"
  "pydantic==2.14.4|the recipe schema (prefopt.config)"
  "pydantic-core==2.50.5|needed by pydantic (==2.50.5)"
  "annotated-types==0.8.0|needed by pydantic"
  "typing-inspection==0.4.5|needed by pydantic"
  "typing-extensions==4.16.0|pydantic needs >=4.16.0 and the version there is not on record (newer ones only add)"
  "datasketch==2.0.0|the data step's near-duplicate search (MinHash LSH)"
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done

mkdir -p "$DEST"
specs=()
for w in "${WHEELS[@]}"; do specs+=("${w%%|*}"); done
echo "gpu_wheels: downloading ${#specs[@]} wheels for CPython $PYVER, manylinux x86_64, into $DEST/"
log=$(mktemp)
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
     "${PLATFORMS[@]}" -d "$DEST" "${specs[@]}" >"$log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2
  echo "gpu_wheels: pip download failed (above)" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
# drop wheels of other versions or names left by an earlier list, then print, size and check what is there
printf '%s\n' "${WHEELS[@]}" | "$PY" scripts/gpu_wheels.py check --dest "$DEST" --python "$PYVER" \
  --limit-mib "$LIMIT_MIB" --machine scripts/gpu_machine.txt
