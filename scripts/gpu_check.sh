#!/usr/bin/env bash
# On a machine with a CUDA GPU (the lent device machine): the GPU-marked tests, bench_dora on the GPU and the
# memory plan against torch.cuda.max_memory_allocated (scripts/measure_memory.py --device cuda),
# within about 12 minutes. Figures and logs go to $OUT (or ./gpu_check_out). Needs prefopt's dependencies
# importable by $PY (a CUDA build of torch; deepspeed for the ZeRO configs); nothing is downloaded.
#     bash scripts/gpu_check.sh                 # the above
#     bash scripts/gpu_check.sh distributed     # the shipped accelerate configs (FSDP-QLoRA, ZeRO-2/3, DDP) under
#                                               # accelerate launch, NCCL, bf16: one process per config on one GPU,
#                                               # two processes against one on two (tests/test_gpu_distributed.py)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 WANDB_MODE=disabled
nvidia-smi -L || { echo "gpu_check: no GPU"; exit 2; }
status=0
if [ "${1:-}" = distributed ]; then
  timeout 560 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_distributed.py 2>&1 \
    | tee "$OUT/gpu_distributed.log" || status=1
  exit $status
fi
timeout 330 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ --ignore tests/test_gpu_distributed.py 2>&1 \
  | tee "$OUT/gpu_tests.log" || status=1
# bf16 weights, plain and under bf16 autocast; dropout 0 and 0.05; NF4 and bf16 bases
timeout 150 "$PY" scripts/bench_dora.py --widths 2048 4096 --layers 2 --batch 4 --seq 512 --rounds 6 \
  --quant nf4 none --json "$OUT/bench_dora_gpu.json" 2>&1 | tee "$OUT/bench_dora_gpu.log" || status=1
# the memory plan against torch.cuda.max_memory_allocated (bf16 autocast; mid/big test models, SFT and DPO)
timeout 240 "$PY" scripts/measure_memory.py --device cuda --models "$OUT/mem_models" --json "$OUT/memory_gpu.json" \
  2>&1 | tee "$OUT/memory_gpu.log" || status=1
exit $status
