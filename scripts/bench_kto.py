"""A prefopt KTO stage against TRL's own KTOTrainer on the same model, adapter and rows: whole-process wall time.

    python scripts/bench_kto.py [--reps 3] [--steps 0] [--hidden 512] [--layers 4] [--quant nf4] [--json out.json]

prefopt: `prefopt run` of a one-stage KTO recipe with every default left alone (DoRA r 16 all-linear, fused AdamW,
batch 2 x gradient accumulation 8, gradient checkpointing, held-out evaluation, reference log-probs precomputed,
balanced weights), one epoch over the demo's KTO feedback (--steps N: N optimizer steps instead); W&B is off. TRL:
the script a user would write with TRL alone -- load the same base the same way, get_peft_model with the same DoRA
config, KTOTrainer with the same hyperparameters and weights, train, evaluate, save -- on prefopt's prepared rows,
in the order prefopt trains them (written to JSONL beforehand, so the TRL process does not import prefopt).
Configurations, each a fresh process, alternating:
  prefopt                    the default above
  trl                        TRL's defaults otherwise (precompute_ref_log_probs=False: the reference every step)
  trl-precompute             TRL with precompute_ref_log_probs=True
  prefopt-peft-dora          (--peft-dora) prefopt with adapter.dora_impl: peft, TRL's own DoRA forward: what is
                             left is the framework's overhead
The figure is prefopt's median wall time over TRL's (target <= 1.10), CPU time beside it.

It checks that both ran the same work: the same optimizer steps and training rows, and the same first-step loss
(policy == reference at step 1; the same batch, weights and DoRA maths give the same number). Otherwise it stops
without a figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TRL = r"""
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import KTOConfig, KTOTrainer

cfg = json.loads(open(sys.argv[1]).read())
rows = lambda p: Dataset.from_list([json.loads(x) for x in open(p)])
train, evals = rows(cfg["train"]), rows(cfg["eval"])
kw = {"dtype": getattr(torch, cfg["dtype"])}
if cfg["quant"] == "nf4":
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=getattr(torch, cfg["dtype"]))
model = AutoModelForCausalLM.from_pretrained(cfg["model"], **kw)
for m in model.modules():  # bitsandbytes 0.50 on CPU: no repack on eval forwards (it breaks; prefopt does the same)
    if type(m).__name__ == "Linear4bit":
        m.support_avx512bf16_for_cpu = False
tok = AutoTokenizer.from_pretrained(cfg["model"])
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                         use_dora=True, task_type="CAUSAL_LM"))
args = KTOConfig(output_dir=cfg["out"], max_steps=cfg["max_steps"], num_train_epochs=1, per_device_train_batch_size=2,
                 per_device_eval_batch_size=2, gradient_accumulation_steps=8, learning_rate=2e-4,
                 lr_scheduler_type="cosine", warmup_steps=0.05, optim="adamw_torch_fused", gradient_checkpointing=True,
                 gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
                 report_to=[], bf16=False, use_cpu=not torch.cuda.is_available(), seed=42, data_seed=42,
                 beta=0.1, desirable_weight=cfg["desirable_weight"], undesirable_weight=cfg["undesirable_weight"],
                 max_length=2048, precompute_ref_log_probs=cfg["precompute"], dataloader_num_workers=0)
trainer = KTOTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok)
trainer.train()
trainer.evaluate()
model.save_pretrained(cfg["out"] + "/adapter")
first = next(h for h in trainer.state.log_history if "loss" in h)
json.dump({"steps": trainer.state.global_step, "rows": len(train), "first_loss": first["loss"]},
          open(cfg["out"] + "/result.json", "w"))
"""


def recipe(model: Path, data: Path, steps: int, quant: str, dtype: str, dora_impl: str = "fast") -> dict:
    return {
        "name": "bench-kto",
        "seed": 42,
        "model": {"name_or_path": str(model), "quantization": quant, "dtype": dtype},
        "adapter": {"dora_impl": dora_impl},
        "stages": [{"name": "kto", "type": "kto", "data": {"path": str(data)},
                    "train": {"max_steps": steps} if steps > 0 else {"epochs": 1}}],
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def prepared_rows(recipe_path: Path, tmp: Path) -> dict:
    """The rows the prefopt run trains and evaluates on, in its order, as JSONL for the TRL process; its weights."""
    from prefopt import load_recipe
    from prefopt.data import recipe_stage_data
    from prefopt.stages import kto

    recipe = load_recipe(recipe_path)
    data = recipe_stage_data(recipe, 0)
    for name, ds in (("train", data.train), ("eval", data.eval)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ds.to_list()))
    d, u, _ = kto.weights(recipe.stages[0], data.train)
    return {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "rows": len(data.train),
            "desirable_weight": d, "undesirable_weight": u}


def run_one(kind: str, tmp: Path, i: int, recipe_path: Path, trl_cfg: dict, env: dict) -> tuple[float, float, dict]:
    out = tmp / f"{kind}-{i}"
    if kind.startswith("prefopt"):
        path = recipe_path if kind == "prefopt" else recipe_path.with_name("kto-peft.yaml")
        cmd = [sys.executable, "-m", "prefopt.cli", "run", str(path), "--output-dir", str(out), "--quiet"]
    else:
        cfg = dict(trl_cfg, out=str(out), precompute=kind == "trl-precompute")
        (tmp / f"{kind}.json").write_text(json.dumps(cfg))
        cmd = [sys.executable, "-c", TRL, str(tmp / f"{kind}.json")]
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"bench_kto: {kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if kind.startswith("prefopt"):
        entry = json.loads((out / "run.json").read_text())["stages"][0]
        first = next(h for h in json.loads((out / "stages" / "00-kto" / "log_history.json").read_text())
                     if "loss" in h)
        done = {"steps": entry["metrics"]["train"]["steps"], "rows": entry["data"]["train_rows"],
                "first_loss": first["loss"], "ref_logps": entry.get("ref_logps", {}).get("mode", "precomputed")}
    else:
        done = json.loads((out / "result.json").read_text())
    return wall, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (max_steps); 0: one epoch")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--peft-dora", action="store_true", help="also prefopt with dora_impl: peft")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    import yaml
    from demo_assets import build_tiny_model

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    kinds = ("prefopt", "trl", "trl-precompute") + (("prefopt-peft-dora",) if args.peft_dora else ())
    wall: dict = {k: [] for k in kinds}
    cpu: dict = {k: [] for k in kinds}
    work: dict = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", ROOT / "data" / "demo", hidden_size=args.hidden,
                                 intermediate_size=int(args.hidden * 2.6875), num_layers=args.layers)
        path = tmp / "kto.yaml"
        feedback = ROOT / "data" / "demo" / "feedback.jsonl"
        path.write_text(yaml.safe_dump(recipe(model, feedback, args.steps, args.quant, dtype)))
        path.with_name("kto-peft.yaml").write_text(yaml.safe_dump(recipe(model, feedback, args.steps, args.quant,
                                                                         dtype, "peft")))
        trl_cfg = {**prepared_rows(path, tmp), "model": str(model), "quant": args.quant, "dtype": dtype,
                   "max_steps": args.steps if args.steps > 0 else -1}
        steps = args.steps if args.steps > 0 else math.ceil(math.ceil(trl_cfg["rows"] / 2) / 8)  # 2 a batch, 8 a step
        env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1",
                   PYTHONPATH=str(ROOT), PREFOPT_CACHE_DIR="off", TQDM_DISABLE="1")
        for i in range(args.reps):
            for kind in kinds[i % len(kinds):] + kinds[: i % len(kinds)]:
                w, c, done = run_one(kind, tmp, i, path, trl_cfg, env)
                wall[kind].append(w)
                cpu[kind].append(c)
                work[kind].append(done)
                print(f"  rep {i}  {kind:15s} {w:6.1f} s wall  {c:6.1f} s CPU  {done}", flush=True)
    ref = work["prefopt"][0]
    for kind in kinds:
        for done in work[kind]:
            if (done["steps"], done["rows"]) != (steps, trl_cfg["rows"]) or \
                    abs(done["first_loss"] - ref["first_loss"]) > 1e-4:
                sys.exit(f"bench_kto: {kind} did not do the same work as prefopt: {done} vs {ref} "
                         f"({steps} steps, {trl_cfg['rows']} rows)")
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"bench_kto: hidden {args.hidden} x {args.layers} layers, {args.quant}, {dtype}, {trl_cfg['rows']} KTO "
          f"rows, {steps} steps (batch 2 x accum 8), same first-step loss {ref['first_loss']:.6f}; medians of "
          f"{args.reps}, whole process:")
    for kind in kinds:
        print(f"  {kind:15s} wall {med[kind]:6.1f} s ({med['prefopt'] / med[kind]:.3f}x: prefopt / this)   CPU "
              f"{med_cpu[kind]:6.1f} s ({med_cpu['prefopt'] / med_cpu[kind]:.3f}x)")
    ratio = med["prefopt"] / med["trl"]
    print(f"bench_kto: prefopt / TRL KTOTrainer (TRL's defaults) = {ratio:.3f} (target <= 1.10); "
          f"/ TRL with precompute_ref_log_probs = {med['prefopt'] / med['trl-precompute']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall": wall, "cpu": cpu, "work": work, "ratio": ratio,
                                               "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
