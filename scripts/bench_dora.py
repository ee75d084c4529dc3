"""Training step time of LoRA, PEFT's DoRA and prefopt's fast DoRA, side by side in one process.

    python scripts/bench_dora.py [--widths 512 1024] [--quant nf4 none] [--dropouts 0 0.05] [--rounds 10] [--steps 1]
                                 [--warm 1] [--accum 1] [--clock wall|cpu] [--optim adamw_torch_fused|adamw_torch]
                                 [--precision fp32 autocast] [--json out.json]

For each base (width x quantization), precision (plain, or under bf16 autocast: mixed precision as TRL runs it
on a GPU, with CPU autocast as its stand-in here) and adapter dropout (0 and 0.05) it builds the same random
4-layer Llama with a LoRA adapter and with a DoRA adapter (r=16, alpha=16, all-linear), then times full training
steps (forward, backward, AdamW step: the recipes' default, fused, unless --optim says otherwise) on a
batch of 4 x 128 tokens.

It proves it times the real work before it reports: PEFT's DoRA and prefopt's start from the same weights and
must give the same loss (1e-5 relative; bf16 autocast: 1e-2); every timed step of prefopt's DoRA must compute
the weight norm exactly once per adapted layer (the norm is fresh after every optimizer step, never skipped);
and at the end the norm each layer uses must equal ||W + s B A|| computed from scratch. Otherwise it stops
without a figure.

Variants are timed in interleaved rounds, so machine noise hits them alike. The order is rotated each round
and reversed every other round, and each timed step follows an untimed step of the same variant (--warm), as
in training: a variant timed right after another one would be charged for the other's freed memory and
evicted caches, and with a rotation alone each variant always follows the same one. Printed: the best
round's ms/step per variant, its ratio to LoRA's best at the same dropout, and the median over rounds of the
ratio to LoRA's time in the same round. Targets on CPU: fast <= 1.05x LoRA (dropout 0), fast/lowrank <= 1.15x
LoRA (dropout 0.05), fast/full no slower than PEFT's DoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class BenchError(RuntimeError):
    """The benchmark did not measure what it claims to: no figure is reported."""


def build(path: Path, quant: str, *, dora: bool, dropout: float, dtype: str, device: str, optim: str):
    import torch

    from prefopt.models import attach_adapter, build_lora_config, load_base_model

    base = load_base_model(str(path), quantization=quant, dtype=dtype)  # on the GPU when there is one
    torch.manual_seed(0)  # lora_A's init: every variant starts from the same adapter
    model = attach_adapter(base, build_lora_config(r=16, alpha=16, dropout=dropout, use_dora=dora), dora_impl="peft")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter that has trained a little: B != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.01 * torch.randn(p.shape, generator=g).to(p))
    model.train()
    # the optimizer a recipe's `train.optim` names (transformers builds torch's AdamW, fused or not, the same way)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=optim == "adamw_torch_fused")
    return model, opt


def time_steps(model, opt, ids, steps: int, accum: int = 1, clock=time.perf_counter, autocast=False) -> float:
    """ms per optimizer step; each step runs `accum` micro-batches (forward + backward) and one AdamW step."""
    import contextlib

    import torch

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    amp = (lambda: torch.autocast(ids.device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    sync()
    t0 = clock()
    for _ in range(steps):
        for _ in range(accum):
            with amp():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (clock() - t0) / steps * 1000


def check_same_start(models: dict, ids, autocast: bool, dtype: str) -> None:
    """PEFT's DoRA and prefopt's, built from the same seed, give the same loss before any timing (dropout off)."""
    import contextlib

    import torch

    losses = {}
    for name, (model, mode) in models.items():
        from prefopt import dora

        if mode:
            dora.enable_fast_dora(model, mode)
        model.eval()
        amp = torch.autocast(ids.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.no_grad(), amp:
            losses[name] = model(input_ids=ids, labels=ids).loss.item()
        model.train()
    ref = losses.pop("peft dora")
    tol = 1e-2 if autocast or dtype != "float32" else 1e-5  # bf16 rounding differs between the two orders of work
    for name, loss in losses.items():
        if abs(loss - ref) > tol * abs(ref):
            raise BenchError(f"{name} loss {loss:.6f} != PEFT DoRA's {ref:.6f}: not the same computation")


def check_fresh_norms(model, ids) -> None:
    """After the last optimizer step, the norm each fast layer uses in the next forward is ||W + s B A|| of its
    current weights."""
    import torch

    from prefopt.quant import dequantize

    with torch.no_grad():
        model(input_ids=ids[:1, :8])
    for m in model.modules():
        plan = m.__dict__.get("_prefopt_cur")  # (the fast forward's cached norm: this check is about that internal)
        if plan is None or plan.s_over_norm is None:
            continue
        w = dequantize(plan.base).float()
        a, b = plan.lora_a.weight.float(), plan.lora_b.weight.float()
        s = m.scaling[plan.name]
        want = torch.linalg.norm(w + s * b @ a, dim=1)
        got = s / plan.s_over_norm.float()
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
            raise BenchError(f"a layer's norm in use is stale: max |diff| {(got - want).abs().max().item():.3e}")


def _cpu_counters():
    """(steal, total) jiffies of this machine's CPUs (Linux /proc/stat), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def bf16_matmul_slowdown(device: str, n: int = 256, reps: int = 3) -> float:
    """How many times slower an n x n x n matmul runs in bf16 than in fp32 here (best of `reps`). At most about 1
    on a GPU (launch cost dominates at this size) or a CPU with native bf16 (AMX / AVX-512 BF16); on a CPU without
    it (AVX2) torch's bf16 matmul is an emulation, ~100x slower: bf16-autocast rows there time the emulation, not
    DoRA against LoRA."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def best(dtype):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        times = []
        for _ in range(reps + 1):  # (the first one warms up)
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(torch.bfloat16) / best(torch.float32)


# wall: elapsed time. cpu: this process's CPU time over all threads (not counting time a virtual machine's CPUs
# were taken away by the host, which on a shared CPU box can swing wall-clock ratios by 10-20%); CPU only.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_base(path: Path, quant: str, args, device: str) -> list[dict]:
    import torch

    from prefopt import dora

    rows = []
    vocab = 500
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    for precision, p in [(pr, d) for pr in args.precision for d in args.dropouts]:
        autocast = precision == "autocast"
        kw = dict(dropout=p, dtype=args.dtype, device=device, optim=args.optim)
        lora = build(path, quant, dora=False, **kw)
        peft = build(path, quant, dora=True, **kw)
        fast = build(path, quant, dora=True, **kw)
        variants = {"lora": (lora, None), "peft dora": (peft, None)}
        if p == 0:
            variants["prefopt dora"] = (fast, "lowrank")  # the two semantics coincide without dropout
        else:
            variants["prefopt dora lowrank"] = (fast, "lowrank")
            variants["prefopt dora full"] = (fast, "full")
        check_same_start({"peft dora": (peft[0], None), "prefopt dora": (fast[0], "lowrank")}, ids, autocast,
                         args.dtype)
        n_fast = dora.fast_dora_layers(fast[0])
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _name, ((model, opt), mode) in variants.items():  # warm up every variant once
            if mode:
                dora.enable_fast_dora(model, mode)
            time_steps(model, opt, ids, 1, args.accum, autocast=autocast)
        names = list(variants)
        for i in range(args.rounds):  # each round times every variant once, in a rotated order
            order = names[i % len(names):] + names[: i % len(names)]
            for name in order if i % 2 == 0 else order[::-1]:  # (reversed every other round: no variant always
                (model, opt), mode = variants[name]             # follows the same one)
                if mode:
                    dora.enable_fast_dora(model, mode)
                # untimed steps first: the timed step follows a step of the same model, as in training, not
                # another variant's (whose freed memory and evicted caches would be charged to it)
                time_steps(model, opt, ids, args.warm, args.accum, autocast=autocast)
                norms = dora.path_counts()["norms"]
                times[name].append(time_steps(model, opt, ids, args.steps, args.accum, CLOCKS[args.clock], autocast))
                if mode and dora.path_counts()["norms"] - norms != n_fast * args.steps:
                    raise BenchError(f"{name}: {dora.path_counts()['norms'] - norms} weight norms computed in "
                                     f"{args.steps} step(s) of {n_fast} DoRA layers; want exactly one per layer "
                                     "per step")
        check_fresh_norms(fast[0], ids)
        # best of the rounds (noise on a shared machine only ever adds time), and the median over rounds of the
        # ratio to LoRA's time in the same round (slow drifts of the machine's speed cancel in it)
        ref = min(times["lora"])
        for name, t in times.items():
            ms = min(t)
            paired = statistics.median(a / b for a, b in zip(t, times["lora"]))
            rows.append({"base": quant, "width": None, "precision": precision, "dropout": p, "variant": name,
                         "ms_per_step": round(ms, 1),
                         "ratio_to_lora": round(ms / ref, 3), "paired_median_ratio": round(paired, 3)})
        del lora, peft, fast, variants
    return rows


def main() -> None:
    from prefopt.config import TrainSection

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--quant", nargs="+", default=["nf4", "none"], choices=["nf4", "int8", "none"])
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=1, help="timed training steps per variant per round")
    ap.add_argument("--warm", type=int, default=1, help="untimed training steps before them, per variant per round")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    ap.add_argument("--dtype", default=None, help="model/compute dtype (default float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or the process's CPU time (CPU runs on a shared machine; see CLOCKS)")
    ap.add_argument("--optim", choices=["adamw_torch_fused", "adamw_torch"], default=TrainSection().optim,
                    help="the optimizer (default: the recipes' default); DoRA has 50%% more tensors to update")
    ap.add_argument("--precision", nargs="+", default=["fp32", "autocast"], choices=["fp32", "autocast"],
                    help="plain (the model's dtype), or under bf16 autocast (the GPU's mixed precision)")
    ap.add_argument("--autocast-sum", choices=["fp32", "bf16"], default="fp32",
                    help="the controlled experiment: the dtype fast DoRA sums its output in under autocast (default "
                         "fp32, as shipped; bf16 shows what the fp32 sum costs)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()

    import torch
    from demo_assets import build_tiny_model

    from prefopt.dora import ops

    ops.AUTOCAST_SUM_DTYPE = torch.float32 if args.autocast_sum == "fp32" else torch.bfloat16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    env = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x {torch.get_num_threads()} threads",
           "torch": torch.__version__, "dtype": args.dtype, "layers": args.layers, "batch": f"{args.batch}x{args.seq}",
           "accum": args.accum, "clock": args.clock, "optim": args.optim, "autocast_sum": args.autocast_sum}
    import peft

    env["peft"] = peft.__version__
    env["bf16_matmul_vs_fp32"] = round(bf16_matmul_slowdown(device), 2)
    print("bench_dora:", ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    if "autocast" in args.precision and env["bf16_matmul_vs_fp32"] > 4:
        print(f"bench_dora: NOTE a bf16 matmul runs {env['bf16_matmul_vs_fp32']}x slower than fp32 on {env['device']} "
              "(no native bf16): the autocast rows time that emulation, not DoRA's cost against LoRA's", flush=True)
    rows = []
    before = _cpu_counters()
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            path = build_tiny_model(Path(tmp) / f"w{width}", ROOT / "data" / "demo", hidden_size=width,
                                    intermediate_size=int(width * 2.6875), num_layers=args.layers)
            for quant in args.quant:
                for row in bench_base(path, quant, args, device):
                    row["width"], row["quant"] = width, quant
                    rows.append(row)
                    print(f"  hidden {width:5d}  {quant:4s}  {row['precision']:8s}  dropout {row['dropout']:<4g}  "
                          f"{row['variant']:21s} "
                          f"{row['ms_per_step']:8.1f} ms/step  {row['ratio_to_lora']:.3f}x LoRA  "
                          f"(paired median: {row['paired_median_ratio']:.3f}x)", flush=True)
                if args.json:  # after every base: a run stopped at its time limit keeps the rows it measured
                    Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    after = _cpu_counters()
    if before and after and after[1] > before[1]:  # a virtual machine's CPUs taken away by the host: wall-time noise
        env["steal_pct"] = round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)
        print(f"bench_dora: steal {env['steal_pct']}% of CPU time during the run", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
