"""prefopt's overhead over a plain hand-written TRL script: the same tiny SFT -> DPO chain, same settings
and seed, run side by side (alternating, each in a fresh process), on a 4-bit DoRA base.

    python scripts/bench_overhead.py [--reps 3] [--steps 30] [--hidden 256] [--layers 4]

Prints the median wall time of each, the ratio prefopt / plain (target <= 1.05), and the final SFT
and DPO train losses of both (they should agree).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

PLAIN = r'''
import json, sys, torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
import bitsandbytes as bnb

cfg = json.loads(sys.argv[1])
model_dir, out = cfg["model"], cfg["out"]
def base():
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    for mod in m.modules():
        if isinstance(mod, bnb.nn.Linear4bit): mod.support_avx512bf16_for_cpu = False
    for p in m.parameters(): p.requires_grad_(False)
    m.config.use_cache = False
    return m
def rows(path):
    return [json.loads(l) for l in open(path)]
def split(rows, frac, seed):
    ds = Dataset.from_list(rows)
    p = ds.train_test_split(test_size=max(1, round(len(ds) * frac)), seed=seed)
    return p["train"], p["test"]
def fp32_adapter(model, make):
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    tr = make()
    for n, p in model.named_parameters():
        if n in saved and p.dtype != saved[n].dtype: p.data = saved[n]
    return tr
tok = AutoTokenizer.from_pretrained(model_dir)
common = dict(seed=0, data_seed=0, max_steps=cfg["steps"], learning_rate=3e-3, lr_scheduler_type="cosine",
    warmup_steps=0.05, per_device_train_batch_size=8, per_device_eval_batch_size=8, gradient_accumulation_steps=1,
    weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", gradient_checkpointing=False, logging_steps=5,
    logging_first_step=True, eval_strategy="no", save_strategy="no", report_to=[], bf16=False, use_cpu=True,
    dataloader_num_workers=0, num_train_epochs=1.0)
lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", use_dora=True, bias="none",
    task_type="CAUSAL_LM")
set_seed(0)
model = get_peft_model(base(), lcfg)
tr, ev = split(rows(cfg["sft"]), 0.1, 0)
t = fp32_adapter(model, lambda: SFTTrainer(model=model, args=SFTConfig(output_dir=out + "/sft", max_length=128,
    packing=False, **common), train_dataset=tr, eval_dataset=ev, processing_class=tok))
sft_loss = t.train().metrics["train_loss"]; t.evaluate()
model.save_pretrained(out + "/sft-adapter")
set_seed(0)
model = PeftModel.from_pretrained(base(), out + "/sft-adapter", is_trainable=True)
tr, ev = split(rows(cfg["prefs"]), 0.15, 0)
t = fp32_adapter(model, lambda: DPOTrainer(model=model, args=DPOConfig(output_dir=out + "/dpo", beta=0.1,
    loss_type=["sigmoid"], max_length=128, **dict(common, learning_rate=2e-3)), train_dataset=tr, eval_dataset=ev,
    processing_class=tok))
dpo_loss = t.train().metrics["train_loss"]; t.evaluate()
model.save_pretrained(out + "/dpo-adapter", selected_adapters=["default"])
print(json.dumps({"sft": sft_loss, "dpo": dpo_loss}))
'''


def recipe(model: Path, steps: int) -> dict:
    train = {"max_steps": steps, "learning_rate": 3e-3, "batch_size": 8, "grad_accum": 1, "max_length": 128,
             "gradient_checkpointing": False, "logging_steps": 5}
    data = ROOT / "data" / "demo"
    return {
        "name": "bench", "seed": 0,
        "model": {"name_or_path": str(model), "quantization": "nf4", "dtype": "float32"},
        # PEFT's DoRA forward on both sides: this measures the framework's overhead (bench_dora.py the forward)
        "adapter": {"method": "dora", "r": 16, "alpha": 16, "dropout": 0.05, "dora_impl": "peft"},
        "stages": [
            {"name": "sft", "type": "sft", "data": {"path": str(data / "sft.jsonl"), "eval_fraction": 0.1},
             "train": train},
            {"name": "dpo", "type": "dpo", "data": {"path": str(data / "prefs.jsonl"), "eval_fraction": 0.15},
             "train": dict(train, learning_rate=2e-3)},
        ],
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    from demo_assets import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", ROOT / "data" / "demo", hidden_size=args.hidden,
                                 intermediate_size=4 * args.hidden, num_layers=args.layers)
        rec = tmp / "bench.yaml"
        rec.write_text(json.dumps(recipe(model, args.steps)))  # JSON is YAML
        times = {"prefopt": [], "plain": []}
        losses = {}
        for rep in range(args.reps):
            for who in ("prefopt", "plain"):
                out = tmp / f"{who}-{rep}"
                if who == "prefopt":
                    cmd = [sys.executable, "-m", "prefopt.cli", "run", str(rec), "--output-dir", str(out)]
                else:
                    cfg = {"model": str(model), "out": str(out), "steps": args.steps,
                           "sft": str(ROOT / "data/demo/sft.jsonl"), "prefs": str(ROOT / "data/demo/prefs.jsonl")}
                    cmd = [sys.executable, "-c", PLAIN, json.dumps(cfg)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                      "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"})
                times[who].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    sys.exit(f"{who} failed:\n{proc.stderr[-3000:]}")
                if who == "plain":
                    losses["plain"] = json.loads(proc.stdout.strip().splitlines()[-1])
                else:
                    m = json.loads((out / "run.json").read_text())
                    losses["prefopt"] = {s["name"]: s["metrics"]["train"]["train_loss"] for s in m["stages"]}
                print(f"rep {rep} {who:7s} {times[who][-1]:6.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nmodel hidden={args.hidden} layers={args.layers}, {args.steps} steps per stage, {args.reps} reps")
        print(f"median wall time: prefopt {med['prefopt']:.1f} s, plain TRL {med['plain']:.1f} s, "
              f"ratio {med['prefopt'] / med['plain']:.3f} (target <= 1.05)")
        for stage in ("sft", "dpo"):
            a, b = losses["prefopt"][stage], losses["plain"][stage]
            print(f"{stage} train loss: prefopt {a:.6f}, plain {b:.6f}, |diff| {abs(a - b):.2e}")


if __name__ == "__main__":
    main()
