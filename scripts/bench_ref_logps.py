"""What the reference pass costs a DPO stage, and what the persistent cache saves.

    python scripts/bench_ref_logps.py [--epochs 2] [--rows 200]

Builds a random Llama (hidden 256, 4 layers, NF4 base, DoRA) offline, trains SFT once, then times the DPO stage
(wall time of the stage's trainer, from the process's own clock) three ways, each in a fresh run folder reusing the
SFT stage from the shared store:
  live         precompute_ref_log_probs: false (the "ref" adapter runs beside the policy every step)
  precompute   precompute_ref_log_probs: true, cache miss (one reference pass before training)
  cached       precompute_ref_log_probs: true, another beta: cache hit (no reference pass)
and checks that the three give the same first-step loss (the reference numbers are the same) before reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--rows", type=int, default=200)
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    from demo_assets import build_tiny_model

    import prefopt

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["PREFOPT_CACHE_DIR"] = str(tmp / "cache")
        model = build_tiny_model(tmp / "model", ROOT / "data" / "demo", hidden_size=256, intermediate_size=512,
                                 num_layers=4)
        prefs = tmp / "prefs.jsonl"
        prefs.write_text("\n".join((ROOT / "data/demo/prefs.jsonl").read_text().splitlines()[: a.rows]) + "\n")
        train = {"batch_size": 4, "grad_accum": 1, "max_length": 128, "learning_rate": 1e-3, "logging_steps": 1,
                 "gradient_checkpointing": False, "checkpoint_every": "off"}
        raw = {"name": "bench", "seed": 0, "model": {"name_or_path": str(model), "quantization": "nf4",
                                                     "dtype": "float32"},
               "stages": [{"name": "sft", "type": "sft", "data": {"path": str(ROOT / "data/demo/sft.jsonl")},
                           "train": {**train, "max_steps": 4}},
                          {"name": "dpo", "type": "dpo", "data": {"path": str(prefs), "eval_fraction": 0},
                           "train": {**train, "epochs": a.epochs}}],
               "tracking": {"wandb": {"mode": "disabled"}}}
        results = {}
        for name, over in (("live", {"stages.1.precompute_ref_log_probs": False}),
                           ("precompute", {"stages.1.precompute_ref_log_probs": True}),
                           ("cached", {"stages.1.precompute_ref_log_probs": True, "stages.1.beta": 0.1000001})):
            recipe = prefopt.recipe_from_dict(raw, overrides=over)
            t0, c0 = time.perf_counter(), time.process_time()
            res = prefopt.run(recipe, output_dir=tmp / name, echo=lambda s: None)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            m = json.loads((res.run_dir / "run.json").read_text())["stages"][1]
            hist = json.loads((res.run_dir / "stages/01-dpo/log_history.json").read_text())
            first = next(h["loss"] for h in hist if "loss" in h)
            runtime = next(h["train_runtime"] for h in hist if "train_runtime" in h)
            ref = m.get("ref_logps", {})
            results[name] = {"stage_s": runtime + ref.get("seconds", 0.0), "train_s": runtime,
                             "ref_s": ref.get("seconds", 0.0), "cache": ref.get("cache", "-"), "first_loss": first,
                             "process_wall_s": wall, "cpu_s": cpu}
    losses = {r["first_loss"] for r in results.values()}
    if max(losses) - min(losses) > 1e-4:
        sys.exit(f"first-step losses differ ({results}); not reporting a timing of different work")
    base, base_cpu = results["live"]["stage_s"], results["live"]["cpu_s"]
    print(f"DPO stage, {a.rows} rows x {a.epochs:g} epochs, hidden 256 x 4 layers, NF4 DoRA, CPU "
          "(wall: the stage's trainer plus its reference pass; CPU: the whole prefopt.run call, same other work):")
    for name, r in results.items():
        print(f"  {name:10s} stage wall {r['stage_s']:7.1f} s (reference pass {r['ref_s']:5.1f} s, cache "
              f"{r['cache']}) = {r['stage_s'] / base:.2f}x live; run CPU {r['cpu_s']:7.1f} s = "
              f"{r['cpu_s'] / base_cpu:.2f}x live; first loss {r['first_loss']:.6f}")


if __name__ == "__main__":
    main()
