"""Whole-process wall time of a default `prefopt run` with a DoRA adapter against the same run with LoRA.

    python scripts/bench_run.py [--reps 3] [--steps 8] [--hidden 512] [--layers 4] [--quant nf4] [--json out.json]

The recipe is an SFT -> DPO chain on a generated random Llama (demo data) with every `train:` default left
alone (fused AdamW, batch 2 x gradient accumulation 8, gradient checkpointing, cosine schedule with warmup),
adapter dropout 0.05, held-out evaluation on; only `max_steps` is set, and W&B is off (it would add the same
seconds to both). The two variants differ in `adapter.method` alone (dora | lora), alternate, each in a fresh
`prefopt run` process, and the figure is the ratio of the medians of whole-process wall time (imports, model
load, both stages, evaluation, saving). Target: DoRA <= 1.10x LoRA. The processes' CPU time (user + system,
all threads) is reported beside it: on a shared machine whose other load stretches wall time, it is the steadier
figure.

It checks that it timed real DoRA: each DoRA process must have computed the weight norm at least once per
adapted layer per optimizer step (a stale norm, computed once and cached, is not DoRA's cost), and the LoRA
processes none. Otherwise it stops without a figure.
"""

from __future__ import annotations

import argparse
import json
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

# `prefopt run` as the CLI runs it, writing the fast-DoRA counters when the process ends
RUN = r"""
import atexit, json, os, sys
from prefopt import dora
atexit.register(lambda: open(os.environ["BENCH_STATS"], "w").write(json.dumps(dora.path_counts())))
from prefopt.cli import main
sys.argv = ["prefopt", "run", *sys.argv[1:]]
main()
"""


def recipe(model: Path, method: str, steps: int, quant: str, dtype: str) -> dict:
    data = ROOT / "data" / "demo"
    return {
        "name": f"bench-{method}",
        "seed": 0,
        "model": {"name_or_path": str(model), "quantization": quant, "dtype": dtype},
        "adapter": {"method": method},  # r 16, alpha 16, dropout 0.05, all-linear: the defaults
        "stages": [
            {"name": "sft", "type": "sft", "data": {"path": str(data / "sft.jsonl")}, "train": {"max_steps": steps}},
            {"name": "dpo", "type": "dpo", "data": {"path": str(data / "prefs.jsonl")}, "train": {"max_steps": steps}},
        ],
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per stage (max_steps)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quant", default="nf4", choices=["nf4", "int8", "none"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    import yaml
    from demo_assets import build_tiny_model

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    times: dict[str, list[float]] = {"dora": [], "lora": []}
    cpu: dict[str, list[float]] = {"dora": [], "lora": []}
    stats: dict[str, list[dict]] = {"dora": [], "lora": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", ROOT / "data" / "demo", hidden_size=args.hidden,
                                 intermediate_size=int(args.hidden * 2.6875), num_layers=args.layers)
        n_layers = args.layers * 7  # q k v o gate up down
        env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1",
                   PYTHONPATH=str(ROOT))
        for i in range(args.reps):
            for method in ("dora", "lora") if i % 2 == 0 else ("lora", "dora"):
                path = tmp / f"{method}.yaml"
                path.write_text(yaml.safe_dump(recipe(model, method, args.steps, args.quant, dtype)))
                env["BENCH_STATS"] = str(tmp / f"{method}.stats.json")
                t0 = time.perf_counter()
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                proc = subprocess.run([sys.executable, "-c", RUN, str(path), "--output-dir",
                                       str(tmp / f"run-{i}-{method}")],
                                      env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu_s = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                if proc.returncode != 0:
                    sys.exit(f"bench_run: {method} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                st = json.loads(Path(env["BENCH_STATS"]).read_text())
                steps = 2 * args.steps
                if method == "dora" and st["norms"] < n_layers * steps:
                    sys.exit(f"bench_run: the DoRA run computed {st['norms']} weight norms for {n_layers} layers x "
                             f"{steps} optimizer steps: the norm was not fresh, so this is not DoRA's cost")
                if method == "lora" and st["fast"] + st["fallback"]:
                    sys.exit("bench_run: the LoRA run went through DoRA layers")
                times[method].append(wall)
                cpu[method].append(cpu_s)
                stats[method].append(st)
                print(f"  rep {i}  {method}  {wall:6.1f} s wall  {cpu_s:6.1f} s CPU  (norms computed {st['norms']}, "
                      f"{st['norms'] / (n_layers * steps):.2f} per layer per optimizer step)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio, ratio_cpu = med["dora"] / med["lora"], med_cpu["dora"] / med_cpu["lora"]
    print(f"bench_run: hidden {args.hidden} x {args.layers} layers, {args.quant}, {dtype}, SFT -> DPO, "
          f"{args.steps} steps each (batch 2 x accum 8), medians of {args.reps}: wall DoRA {med['dora']:.1f} s, "
          f"LoRA {med['lora']:.1f} s, ratio {ratio:.3f} (target <= 1.10); CPU time DoRA {med_cpu['dora']:.1f} s, "
          f"LoRA {med_cpu['lora']:.1f} s, ratio {ratio_cpu:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall": times, "cpu": cpu, "stats": stats, "ratio": ratio,
                                               "ratio_cpu": ratio_cpu, "args": vars(args)}))


if __name__ == "__main__":
    main()
