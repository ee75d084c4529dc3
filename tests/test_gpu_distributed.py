"""Launchers on GPUs (`pytest -m gpu`, skipped without enough CUDA devices): the shipped accelerate configs with NCCL,
bf16 and bitsandbytes' CUDA kernels -- what tests/test_distributed.py runs on CPU with gloo in fp32. One GPU runs
each config with one process (FSDP and ZeRO-3 wrap and gather even then); two GPUs run two processes against one
process with the same global batch. `scripts/gpu_check.sh` runs these."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, chain_recipe
from test_distributed import _free_port, _losses

import prefopt
from prefopt import recipe_from_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _recipe(tiny_model, small_data, quantization: str, batch_size: int) -> dict:
    raw = chain_recipe(tiny_model, small_data, "dpo", quantization=quantization)
    raw["model"].update(dtype="bfloat16", **({"quant_storage": "bfloat16"} if quantization == "nf4" else {}))
    raw["adapter"]["dropout"] = 0.0  # each rank draws its own masks
    raw["merge"] = {"base": "auto", "dtype": "bfloat16"}
    for st in raw["stages"]:
        st["train"].update(batch_size=batch_size, grad_accum=1, gradient_checkpointing=True)
    return raw


@pytest.mark.parametrize("config,quantization,processes", [
    ("fsdp_qlora", "nf4", 1), ("zero3", "none", 1), ("zero2", "nf4", 1),
    ("fsdp_qlora", "nf4", 2), ("zero3", "none", 2), ("ddp", "nf4", 2),
])
def test_shipped_launch_configs_on_gpus(tmp_path, tiny_model, small_data, config, quantization, processes):
    if torch.cuda.device_count() < processes:
        pytest.skip(f"needs {processes} GPUs")
    if config.startswith("zero"):
        pytest.importorskip("deepspeed")
    single = prefopt.run(recipe_from_dict(_recipe(tiny_model, small_data, quantization, 4)),
                         output_dir=tmp_path / "single")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model, small_data, quantization, 4 // processes)))
    out = tmp_path / "launched"
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch",
                           "--config_file", str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"),
                           "--num_processes", str(processes), "--main_process_port", str(_free_port()),
                           "-m", "prefopt", "run", str(path), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)  # (configs name files)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["done", "done"] and m["merge"]["status"] == "done"
    for stage in ("00-sft", "01-dpo"):
        want, got = _losses(single.run_dir, stage), _losses(out, stage)
        assert [s for s, _ in got] == [s for s, _ in want]
        for (s, a), (_, b) in zip(want, got):  # bf16: FSDP's policy casts the weights, one process autocasts
            assert b == pytest.approx(a, rel=3e-2), (config, stage, s, a, b)
    first = next(h for h in json.loads((out / "stages" / "01-dpo" / "log_history.json").read_text())
                 if "rewards/margins" in h)
    live = config != "ddp"  # bf16 under FSDP / DeepSpeed: the reference runs live, through the wrapped model
    assert (m["stages"][1]["ref_logps"].get("mode") == "live") == live
    if live:
        assert first["rewards/margins"] == 0.0, first  # policy == reference at step 0
