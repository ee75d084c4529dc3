"""Several processes: `torchrun --nproc_per_node 2 -m prefopt run` on CPU (gloo), one writer, the same losses as
one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import DEMO_DATA, ROOT, chain_recipe

import prefopt
from prefopt import recipe_from_dict


def _losses(run_dir, stage) -> list:
    history = json.loads((run_dir / "stages" / stage / "log_history.json").read_text())
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def _recipe(tiny_model, small_data, batch_size) -> dict:
    raw = chain_recipe(tiny_model, small_data, "dpo", quantization="none", wandb="offline")
    for st in raw["stages"]:
        st["train"].update(batch_size=batch_size, grad_accum=1)
    # dropout off: each rank draws its own dropout masks, so only a dropout-free run can match one process exactly
    raw["adapter"]["dropout"] = 0.0
    raw["merge"] = {"base": "auto", "dtype": "float32"}
    return raw


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_model, small_data):
    single = prefopt.run(recipe_from_dict(_recipe(tiny_model, small_data, 4)), output_dir=tmp_path / "single")

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model, small_data, 2)))  # 2 ranks x 2 rows = the same global batch
    out = tmp_path / "ddp"
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFOPT_CACHE_DIR": str(tmp_path / "ddp-cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           "-m", "prefopt", "run", str(path), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["done", "done"] and m["merge"]["status"] == "done"
    assert (out / "merged" / "merge_report.json").is_file()
    # one console, one writer: each line once, one W&B run per stage and one for the merge (its model artifact)
    assert proc.stdout.count("prefopt run chain: done") == 1, proc.stdout  # one summary: the main process
    assert proc.stderr.count("prefopt: stage sft done") == 1
    assert len(list((out / "wandb").glob("offline-run-*"))) == 3
    for stage in ("00-sft", "01-dpo"):
        want, got = _losses(single.run_dir, stage), _losses(out, stage)
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) == 4
        for (s, a), (_, b) in zip(want, got):
            assert b == pytest.approx(a, rel=1e-4), (stage, s, a, b)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_torchrun_evaluates_in_a_process_of_its_own(tmp_path, tiny_model, small_data):
    """Under a launcher the recipe's evaluation (lm-eval, generation: collectives of their own) runs as `prefopt
    eval` in a process of its own, from the main process, while the others wait: a failed gate stops every rank
    before the merge, said once; rerun with the gate relaxed, the stages are skipped, the evaluation is redone (its
    gates changed) and the run merges."""
    raw = _recipe(tiny_model, small_data, 2)
    raw["eval"] = {"mmlu": {"path": str(DEMO_DATA / "mmlu_synthetic"), "num_fewshot": 0},
                   "completions": {"n": 2, "max_new_tokens": 4}, "gates": {"max_mmlu_drop": -100}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFOPT_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "ddp"

    def torchrun(*extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                               "-m", "prefopt", "run", str(path), "--output-dir", str(out), *extra],
                              capture_output=True, text=True, timeout=900, env=env)

    proc = torchrun()
    assert proc.returncode != 0 and "ChildFailedError" in proc.stderr  # torchrun's own code for a failed rank: 1
    assert proc.stderr.count("prefopt: error: gate max_mmlu_drop failed") == 1, proc.stderr[-3000:]
    assert "exitcode: 3" in proc.stderr  # every rank exits 3, torchrun itself 1
    assert "prefopt: unexpected error" not in proc.stderr  # (the traceback is torchrun's own, of its failed ranks)
    m = json.loads((out / "run.json").read_text())
    assert m["eval"]["passed"] is False and not (out / "merged").exists()
    assert json.loads((out / "eval" / "eval_log.json").read_text())["mmlu"]["tuned"]["n"] == 24

    proc = torchrun("--set", "eval.gates.max_mmlu_drop=100")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("done and unchanged, skipped") == 2, proc.stderr[-3000:]  # both stages
    m = json.loads((out / "run.json").read_text())
    assert m["eval"]["passed"] is True and m["merge"]["status"] == "done" and (out / "merged").is_dir()
    assert proc.stderr.count("prefopt: eval: in a process of its own") == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_on_cpu(tmp_path, raw: dict, config: str, *launch_args):
    """`accelerate launch --config_file recipes/accelerate/<config>.yaml` on 2 CPU processes (scripts/launch_cpu.py)."""

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sharded"
    (tmp_path / "shards").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFOPT_CACHE_DIR": str(tmp_path / "sharded-cache"),
           "LAUNCH_CPU_REPORT": str(tmp_path / "shards"),
           "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"), *launch_args,
                           "--num_processes", "2", "--main_process_port", str(_free_port()),
                           str(ROOT / "scripts" / "launch_cpu.py"), "run", str(path), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)  # (configs name files)
    return out, proc


def _shards(out) -> list[dict]:
    return [json.loads(line) for f in sorted((out.parent / "shards").glob("rank*.jsonl"))
            for line in f.read_text().splitlines()]


def _same_as_one_process(single_dir, out):
    from safetensors.torch import load_file

    for stage in ("00-sft", "01-dpo"):
        want, got = _losses(single_dir, stage), _losses(out, stage)
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) == 4
        for (s, a), (_, b) in zip(want, got):
            assert b == pytest.approx(a, rel=1e-4), (stage, s, a, b)
        a = load_file(single_dir / "stages" / stage / "adapter" / "adapter_model.safetensors")
        b = load_file(out / "stages" / stage / "adapter" / "adapter_model.safetensors")
        assert sorted(a) == sorted(b) and not any(k.count(".ref.") for k in b)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fsdp2_on_cpu_matches_one_process(tmp_path, tiny_model, small_data, quantization):
    """The shipped FSDP config (recipes/accelerate/fsdp_qlora.yaml, fp32 here) on 2 CPU processes: every weight a
    DTensor shard (the 4-bit base too, in float32 storage), DoRA's norm computed on the gathered weights inside the
    layer's forward, DPO's reference precomputed, the adapter gathered from its shards and saved, merged -- and the
    same per-step losses and adapter as one process with the same global batch. (accelerate routes FSDP only on
    accelerators; scripts/launch_cpu.py takes its GPU branch on the CPU, see there.)"""
    def recipe(batch_size):
        raw = _recipe(tiny_model, small_data, batch_size)
        raw["model"].update(quantization=quantization,
                            **({"quant_storage": "float32"} if quantization == "nf4" else {}))
        for st in raw["stages"]:
            st["train"]["gradient_checkpointing"] = True  # the recipe default
        return raw

    single = prefopt.run(recipe_from_dict(recipe(4)), output_dir=tmp_path / "single")
    out, proc = _sharded_on_cpu(tmp_path, recipe(2), "fsdp_qlora", "--mixed_precision", "no")
    assert proc.returncode == 0, proc.stderr[-4000:]
    shards = _shards(out)
    assert len(shards) == 4, proc.stderr[-3000:]  # 2 ranks x 2 stages
    for s in shards:  # FSDP really ran: (nearly) every weight a DTensor, half of its elements on each rank
        assert s["sharded"] >= s["params"] - 1 and 2 * s["local"] == s["full"], s
        assert "FSDPLinear" in s["classes"] and ("Linear4bit" in s["classes"]) == (quantization == "nf4"), s
    m = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["done", "done"] and m["merge"]["status"] == "done"
    assert proc.stderr.count("prefopt: stage sft done") == 1
    _same_as_one_process(single.run_dir, out)


@pytest.mark.parametrize("env,quantization,expect", [
    ({"FSDP_VERSION": "1"}, "none", "fsdp_version 1: prefopt runs FSDP version 2"),
    ({"FSDP_VERSION": "2"}, "nf4", "uint8 (the default) keeps the 4-bit base weights out of FSDP's shards"),
    ({"FSDP_VERSION": "2"}, "int8", "int8 under FSDP: bitsandbytes' 8-bit weights cannot be sharded"),
    ({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     "nf4", "r.yaml line 9): nf4 under DeepSpeed ZeRO-3: DeepSpeed partitions only weights it creates itself"),
    ({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "true",  # the shipped config: a DeepSpeed file
      "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "recipes" / "accelerate" / "zero3.json")}, "nf4",
     "nf4 under DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, "none",
     "zero3_init_flag true: prefopt loads every stage's base whole"),
])
def test_launcher_settings_prefopt_cannot_honour_are_user_errors(tmp_path, tiny_model, small_data, monkeypatch, env,
                                                            quantization, expect):
    from click.testing import CliRunner

    from prefopt.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(chain_recipe(tiny_model, small_data, "dpo", quantization=quantization)))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(main, ["run", str(path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert expect in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "stages").exists()  # said before any model loads


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_fsdp2_mixed_precision_dpo_starts_at_its_reference(tmp_path, tiny_model, small_data):
    """The shipped FSDP config as it is (bf16): FSDP's mixed-precision policy runs the policy on bf16 weights, so a
    reference precomputed before the model is wrapped (fp32 weights, autocast) is not the policy at step 0 (measured:
    margin -0.0069). prefopt computes the reference live there, through the wrapped model: margin exactly 0."""
    out, proc = _sharded_on_cpu(tmp_path, _recipe(tiny_model, small_data, 2), "fsdp_qlora")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("prefopt: stage dpo: reference computed live, every step: under FSDP with bf16") == 1
    history = json.loads((out / "stages" / "01-dpo" / "log_history.json").read_text())
    first = next(h for h in history if "rewards/margins" in h)
    assert first["step"] == 1 and first["rewards/margins"] == 0.0, first
    entry = json.loads((out / "run.json").read_text())["stages"][1]
    assert entry["ref_logps"]["mode"] == "live" and "bf16" in entry["ref_logps"]["why"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("config,quantization", [("zero3", "none"), ("zero2", "nf4")])
def test_deepspeed_on_cpu_matches_one_process(tmp_path, tiny_model, small_data, config, quantization):
    """The shipped recipes/accelerate/zero{3,2}.yaml (fp32 here) on 2 CPU processes with DeepSpeed's CPU accelerator.
    ZeRO-3: every weight partitioned, DoRA through PEFT's forward (the layers' hooks gather the weights), DPO's
    reference live (TRL's reference forward needs the engine's partitioned weights), every stage and the merge
    loading whole weights. ZeRO-2 on a 4-bit base: the reference precomputed. Both: the adapter gathered and saved,
    the same losses and adapter as one process."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is the `deepspeed` extra (scripts/setup.sh installs it)")

    def recipe(batch_size):
        raw = _recipe(tiny_model, small_data, batch_size)
        raw["model"]["quantization"] = quantization
        return raw

    single = prefopt.run(recipe_from_dict(recipe(4)), output_dir=tmp_path / "single")
    out, proc = _sharded_on_cpu(tmp_path, recipe(2), config, "--mixed_precision", "no")
    assert proc.returncode == 0, proc.stderr[-4000:]
    shards = _shards(out)
    assert len(shards) == 4, proc.stderr[-3000:]
    m = json.loads((out / "run.json").read_text())
    if config == "zero3":
        for s in shards:  # ZeRO-3 really ran: every weight partitioned, half of its elements on each rank
            assert s["sharded"] == s["params"] and 2 * s["local"] == s["full"], s
        assert proc.stderr.count("prefopt: stage dpo: reference computed live, every step: under DeepSpeed ZeRO-3") == 1
        assert m["stages"][1]["ref_logps"]["mode"] == "live"
    else:
        assert all(s["sharded"] == 0 and "Linear4bit" in s["classes"] for s in shards), shards
        assert m["stages"][1]["ref_logps"]["cache"] == "miss"
    assert [s["status"] for s in m["stages"]] == ["done", "done"] and m["merge"]["status"] == "done"
    _same_as_one_process(single.run_dir, out)


def test_shipped_accelerate_configs_parse():
    """Every shipped accelerate config loads in accelerate's own config reader (ddp.yaml's launch is torchrun's)."""
    from accelerate.commands.config.config_args import load_config_from_file


    configs = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"ddp", "fsdp_qlora", "zero2", "zero3"}
    for c in configs:
        cfg = load_config_from_file(str(c))
        assert cfg.num_processes == 2 and cfg.distributed_type is not None, c
