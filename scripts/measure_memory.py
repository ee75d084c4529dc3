"""Measure a stage's peak tensor memory on CPU and compare it with prefopt's memory plan (prefopt.memory).

    python scripts/measure_memory.py                 # the validation grid: tiny + mid-size models, SFT / DPO,
                                                     # fp32 / NF4, with and without gradient checkpointing
    python scripts/measure_memory.py --json out.json

How the peak is measured (exact, not sampled): the base model and its adapter are built, then the live bytes of
every tensor they own (parameters, buffers, bitsandbytes quant states; each storage once) are the baseline. Two
optimizer steps of the stage's real TRL trainer (prefopt's stage module: trainer construction, DPO's "ref" adapter
copy, the forward/backward passes, the optimizer and its state, saving) run under torch.profiler with
profile_memory=True. c10's CPU allocator reports every allocation and free made while profiling with the running
total of live bytes it handed out since profiling began (`total_allocated`); the peak is the baseline plus the
largest running total. That is what `torch.cuda.max_memory_allocated` counts on a GPU (tensor bytes, not the
caching allocator's reserve). Rows are long enough that every sequence is cut at max_length, so the planner's
worst case is the measured case. Never imported by prefopt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

MODELS = {  # name -> build_tiny_model shape (the demo tokenizer's vocabulary, 606 tokens)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2),
    "mid": dict(hidden_size=384, intermediate_size=1024, num_layers=8, num_attention_heads=6, num_key_value_heads=2),
    # wide enough that, under gradient checkpointing, one layer recomputed outweighs the LM head's tile buffer
    "wide": dict(hidden_size=1024, intermediate_size=2816, num_layers=2, num_attention_heads=8, num_key_value_heads=4),
    "big": dict(hidden_size=2048, intermediate_size=5632, num_layers=8, num_attention_heads=16, num_key_value_heads=4),
}
GRID = [  # model, stage type, quantization, gradient checkpointing, batch size, max_length, DPO reference
    ("tiny", "sft", "none", False, 4, 256, None),
    ("tiny", "dpo", "none", False, 2, 256, "previous_stage"),
    ("mid", "sft", "none", False, 2, 256, None),
    ("mid", "sft", "none", True, 2, 256, None),
    ("mid", "sft", "nf4", False, 2, 256, None),
    ("mid", "sft", "nf4", False, 4, 512, None),
    ("mid", "sft", "nf4", True, 4, 512, None),
    ("mid", "dpo", "none", False, 2, 192, "previous_stage"),
    ("mid", "dpo", "nf4", True, 2, 192, "previous_stage"),
    ("mid", "dpo", "nf4", False, 2, 384, "previous_stage"),
    ("mid", "dpo", "none", False, 2, 192, "base"),
    ("mid", "dpo", "none", False, 2, 192, "precompute"),
    ("mid", "orpo", "none", False, 2, 192, None),
    ("mid", "simpo", "nf4", True, 2, 192, None),
    ("wide", "sft", "none", True, 2, 512, None),
    ("wide", "sft", "nf4", True, 1, 512, None),
    ("wide", "dpo", "nf4", True, 1, 512, "previous_stage"),
]
SHARDED_GRID = [  # under --launch (2 CPU processes), per-process batch; the estimate with --sharding and --gpus 2
    ("mid", "sft", "none", False, 2, 256, None),
    ("mid", "dpo", "none", False, 2, 192, "previous_stage"),
    ("mid", "sft", "nf4", True, 2, 512, None),
    ("wide", "sft", "none", True, 1, 256, None),
]
def sharded_grid(sharding: str) -> list:
    """SHARDED_GRID, less what the sharding refuses (ZeRO-3: a quantized base, prefopt.dist.launcher_problems)."""
    return [row for row in SHARDED_GRID if not (sharding == "zero3" and row[2] != "none")]


GPU_GRID = [  # bf16 under autocast, as prefopt trains on a GPU (scripts/gpu_check.sh)
    ("mid", "sft", "nf4", False, 4, 512, None),
    ("big", "sft", "nf4", True, 4, 1024, None),
    ("big", "sft", "nf4", False, 2, 1024, None),
    ("big", "dpo", "nf4", True, 2, 1024, "previous_stage"),
    ("big", "dpo", "none", False, 1, 1024, "precompute"),
]


def build_model(name: str, root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_assets import build_tiny_model

    out = root / name
    if not (out / "config.json").exists():
        build_tiny_model(out, ROOT / "data" / "demo", **MODELS[name])
    return out


def long_rows(stage_type: str, n: int) -> list[dict]:
    """Rows far longer than any max_length used here, so every sequence is truncated to exactly max_length."""
    words = "the sea is kind and calm and bright and gentle and warm and lovely ".split()
    text = lambda i: " ".join(words[(i + j) % len(words)] for j in range(900))  # noqa: E731
    if stage_type == "sft":
        return [{"messages": [{"role": "user", "content": f"Tell me about the sea {i}."},
                              {"role": "assistant", "content": text(i)}]} for i in range(n)]
    return [{"prompt": [{"role": "user", "content": f"Tell me about the sea {i}."}],
             "chosen": [{"role": "assistant", "content": text(i)}],
             "rejected": [{"role": "assistant", "content": text(i + 3)}]} for i in range(n)]


def live_bytes(model, buffers: bool = True) -> int:
    """Bytes of every tensor the model owns (parameters, buffers, 4-bit quant states), each storage once."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in seen:
                seen.add(key)
                total += st.nbytes()

    for t in list(model.parameters()) + (list(model.buffers()) if buffers else []):
        add(t)
        qs = getattr(t, "quant_state", None)
        while qs is not None:
            add(qs.absmax)
            add(qs.code)
            add(getattr(qs, "offset", None))
            qs = getattr(qs, "state2", None)
    return total


def profiled_peak(fn) -> int:
    """Run fn() with the profiler's memory tracking on; the largest number of bytes allocated and still live."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack += node.children
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def measure(model_dir: Path, stage_type: str, *, quantization: str, gradient_checkpointing: bool, batch_size: int,
            max_length: int, reference: str | None = None, r: int = 8, optim: str = "adamw_torch",
            steps: int = 2, dtype: str = "float32", device: str = "cpu", sharding: str = "none") -> dict:
    """The measured peak of `steps` optimizer steps of one stage, and the plan's estimate for the same settings.
    On device "cuda" the peak is torch.cuda.max_memory_allocated (reset once the model is loaded)."""
    import torch

    from prefopt.api import train_stage
    from prefopt.config import AdapterSection, TrainSection
    from prefopt.memory import estimate_stage, model_shape
    from prefopt.models import attach_adapter, build_lora_config, load_base_model, load_tokenizer

    torch.manual_seed(0)
    train = dict(max_steps=steps, batch_size=batch_size, grad_accum=1, max_length=max_length, learning_rate=1e-3,
                 gradient_checkpointing=gradient_checkpointing, logging_steps=1, warmup_ratio=0.0,
                 checkpoint_every="off", optim=optim)
    stage = {"name": stage_type, "type": stage_type, "train": train}
    if stage_type == "dpo":
        stage.update(reference="base" if reference == "base" else "previous_stage",
                     precompute_ref_log_probs=reference == "precompute")
    adapter = AdapterSection(r=r, alpha=2 * r, dropout=0.05)
    base = load_base_model(str(model_dir), quantization=quantization, dtype=dtype)
    tok = load_tokenizer(str(model_dir))
    model = attach_adapter(base, build_lora_config(r=r, alpha=2 * r, dropout=0.05))
    baseline = live_bytes(model)
    rows = long_rows(stage_type, batch_size * steps)
    with tempfile.TemporaryDirectory() as out:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_stage(stage, model, tok, rows, output_dir=out, seed=0)
            measured = torch.cuda.max_memory_allocated()
        elif sharding in ("fsdp", "zero3"):
            # The trainer replaces every parameter with its shard and frees the whole one, but the profiler cannot
            # subtract frees of blocks allocated before it started: after the sharding, what is live is the
            # baseline less the whole parameters plus the running total (checked with gc: no whole parameter
            # storage survives the sharding); before it, the baseline (the load: each process holds it all).
            params = live_bytes(model, buffers=False)
            measured = max(baseline, baseline - params + profiled_peak(
                lambda: train_stage(stage, model, tok, rows, output_dir=out, seed=0)))
        else:
            measured = baseline + profiled_peak(lambda: train_stage(stage, model, tok, rows, output_dir=out, seed=0))
    est = estimate_stage(model_shape(str(model_dir)), stage_type=stage_type, quantization=quantization,
                         dtype=dtype, adapter=adapter, train=TrainSection(**train),
                         reference="base" if reference == "base" else "previous_stage", device=device,
                         gpus=int(os.environ.get("WORLD_SIZE", "1")),
                         # ZeRO-3 is not in the plan: measured against FSDP's arithmetic (what it shards is the same)
                         sharding="fsdp" if sharding == "zero3" else sharding)
    return {"stage": stage_type, "quantization": quantization, "gradient_checkpointing": gradient_checkpointing,
            "batch_size": batch_size, "max_length": max_length, "reference": reference,
            "measured_bytes": measured, "baseline_bytes": baseline, "estimate_bytes": est["peak_bytes"],
            "ratio": round(est["peak_bytes"] / measured, 3), "components": est["components"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--models", default=None, help="folder to build the test models in (default: a temp folder)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: fp32, the profiler's allocator peak; cuda: bf16 autocast, "
                    "torch.cuda.max_memory_allocated")
    ap.add_argument("--row", type=int, default=0, help=argparse.SUPPRESS)  # under --launch: the grid row
    ap.add_argument("--rows", type=int, nargs="*", default=None, help="only these rows of the grid (0-based)")
    ap.add_argument("--launch", choices=["fsdp", "zero3", "zero2"], default=None,
                    help="measure under the shipped accelerate config on 2 CPU processes (scripts/launch_cpu.py; "
                    "zero*: needs deepspeed), against the plan with --sharding and --gpus 2; the peak of each process")
    args = ap.parse_args()
    if args.launch and "RANK" not in os.environ:
        return launch(args)
    if args.launch:
        import launch_cpu  # noqa: F401  (accelerate's FSDP / DeepSpeed on CPU)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(2)
    grid, dtype = (GRID, "float32") if args.device == "cpu" else (GPU_GRID, "bfloat16")
    if args.launch:  # one row per launch: a process keeps DeepSpeed's buffers from one engine to the next
        grid = [sharded_grid(args.launch)[args.row]]
    elif args.rows is not None:
        grid = [grid[i] for i in args.rows]
    root = Path(args.models or tempfile.mkdtemp(prefix="prefopt-mem-"))
    results = []
    print(f"{'model':5} {'stage':5} {'quant':5} {'ckpt':5} {'batch':>5} {'len':>5} {'reference':14} "
          f"{'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6}")
    for name, stage, quant, gc, bs, length, ref in grid:
        res = {"model": name, **measure(build_model(name, root), stage, quantization=quant, gradient_checkpointing=gc,
                                        batch_size=bs, max_length=length, reference=ref, dtype=dtype,
                                        device=args.device, sharding=args.launch or "none")}
        results.append(res)
        print(f"{name:5} {stage:5} {quant:5} {str(gc):5} {bs:5} {length:5} {str(ref or '-'):14} "
              f"{res['estimate_bytes'] / 2**20:12.2f} {res['measured_bytes'] / 2**20:12.2f} {res['ratio']:6.3f}",
              flush=True)
        if args.json:  # after every row: a run stopped at its time limit (scripts/gpu_check.py) keeps what it measured
            out = Path(args.json)
            if args.launch:  # each process its own table (launch() compares the larger peak)
                out = out.with_name(f"rank{os.environ['RANK']}.json")
            out.write_text(json.dumps(results, indent=1))


def launch(args) -> None:
    """Run this script's grid under `accelerate launch --config_file recipes/accelerate/<config>.yaml` on 2 CPU
    processes; each process writes its own table; the larger measured peak of the two is the one compared."""
    import subprocess

    config = {"fsdp": "fsdp_qlora"}.get(args.launch, args.launch)
    root = Path(args.models or tempfile.mkdtemp(prefix="prefopt-mem-"))
    for name in sorted({row[0] for row in SHARDED_GRID}):
        build_model(name, root)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ranks = []
    for row in (args.rows or range(len(sharded_grid(args.launch)))):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"), "--mixed_precision", "no",
                   "--num_processes", "2", "--main_process_port", "29533", __file__, "--launch", args.launch,
                   "--row", str(row), "--models", str(root), "--json", str(Path(tmp) / "rank.json")]
            code = subprocess.run(cmd, env=env, cwd=ROOT).returncode  # (the DeepSpeed configs name files)
            if code:
                sys.exit(code)
            ranks.append([json.loads(f.read_text())[0] for f in sorted(Path(tmp).glob("rank*.json"))])
    rows = []
    for per_rank in ranks:
        worst = max(per_rank, key=lambda r: r["measured_bytes"])
        rows.append({**worst, "ratio": round(worst["estimate_bytes"] / worst["measured_bytes"], 3),
                     "sharding": args.launch, "processes": 2})
        print(f"{args.launch:6} {worst['model']:5} {worst['stage']:5} {worst['quantization']:5} "
              f"{str(worst['gradient_checkpointing']):5} {worst['batch_size']:3} x {worst['max_length']:4}  estimate "
              f"{worst['estimate_bytes'] / 2**20:9.2f} MiB  measured {worst['measured_bytes'] / 2**20:9.2f} MiB  "
              f"ratio {rows[-1]['ratio']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
