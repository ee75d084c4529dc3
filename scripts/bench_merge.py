"""prefopt's merge vs PEFT's load-then-merge_and_unload, side by side, on a locally generated random Llama of about
1.8 GB (bf16) in several shards, with a DoRA adapter (r=16, all linear layers).

    python scripts/bench_merge.py [--reps 2] [--layers 16] [--hidden 2048] [--shard-mb 400]

Each merge runs in its own fresh process that reports its own wall time and peak RSS (VmHWM; see peak_rss_mb):
prefopt's default merge (merged and verified, as `prefopt merge` runs it: the merge in a thread of its own while
the verification starts, then one forward of the adapter model as trained beside the merged model read back from
its files), prefopt's merge with verification off, and PEFT's load-then-merge. The three alternate their order
from rep to rep. One table: median wall and peak RSS, their ratios to PEFT's (targets for the default: wall
<= 1.0, RSS <= 0.35), and the default merge's time split (merge, verification) from its merge_report.json. Before
any ratio is printed the script checks that the work was done: every adapted tensor merged and checked layer by
layer, the read-back clean, the verification passed, the verified and unverified checkpoints equal bit for bit,
and both within bf16 rounding of PEFT's merge on every adapted tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

PREFOPT = r'''
import json, resource, sys, time

def peak_rss_mb():
    # VmHWM: this process's own high-water mark. ru_maxrss is not: Linux carries the parent's RSS at fork
    # over into the child's ru_maxrss, which floored prefopt's figure at this script's own RSS.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
from prefopt.merging.stream import merge_adapter
adapter, base, out = sys.argv[1:4]
report = merge_adapter(adapter, out, base=base, quantization="none", dtype="bfloat16", out_dtype="bfloat16",
                       verify_merge=sys.argv[4] == "verify", echo=lambda s: None)
v = report.get("verification") or {}
print(json.dumps({"wall": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "time_s": report.get("time_s"),
                  "tensors_merged": report["tensors_merged"],
                  "verification": {k: v.get(k) for k in ("passed", "max_rel_logit_diff", "mean_kl",
                                                         "top1_agreement", "layers", "read_back", "tokens")}}))
'''

PEFT = r'''
import json, resource, sys, time

def peak_rss_mb():
    # VmHWM: this process's own high-water mark. ru_maxrss is not: Linux carries the parent's RSS at fork
    # over into the child's ru_maxrss, which floored prefopt's figure at this script's own RSS.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
adapter, base, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="400MB")
print(json.dumps({"wall": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}))
'''


def make_model(out: Path, *, layers: int, hidden: int, inter: int, vocab: int, shard_mb: int) -> int:
    """Random bf16 Llama weights written shard by shard (never whole in memory), plus config + tokenizer."""
    import torch
    from demo_assets import build_tokenizer
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True)
    build_tokenizer(out, ROOT / "data" / "demo")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, n, total = {}, {}, 0, 0, 0
    names = []

    def flush():
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = name
        names.append(name)
        shard, size, n = {}, 0, n + 1

    for key, shape in shapes.items():
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_mb * 2**20:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def make_adapter(base: Path, out: Path, *, layers: int, hidden: int, inter: int, r: int = 16) -> None:
    """A DoRA adapter with random weights, written directly in PEFT's format (keys, config)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for i in range(layers):
        for mod, (o, n_in) in {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                               "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                               "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                               "mlp.down_proj": (hidden, inter)}.items():
            key = f"model.layers.{i}.{mod}"
            with safe_open(str(base / index[key + ".weight"]), framework="pt") as f:
                w = f.get_tensor(key + ".weight").float()
            p = f"base_model.model.{key}"
            tensors[p + ".lora_A.weight"] = torch.randn(r, n_in, generator=g) / n_in**0.5
            tensors[p + ".lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
            tensors[p + ".lora_magnitude_vector"] = w.norm(dim=1) * (1 + 0.05 * torch.rand(o, generator=g))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "use_dora": True, "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": str(base), "inference_mode": True,
    }))


def _run(who: str, code: str, mode: str, tmp: Path) -> dict:
    import shutil

    shutil.rmtree(tmp / who, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp / "adapter"), str(tmp / "base"), str(tmp / who), mode],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{who} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tensors(folder: Path):
    """(key, tensor) of a checkpoint folder, one tensor at a time."""
    from safetensors import safe_open

    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                yield k, sf.get_tensor(k)


def _check_work(tmp: Path, res: dict, n_adapted: int) -> float:
    """The work was done: every adapted tensor merged and checked, the read-back clean, verification passed; the
    verified and unverified checkpoints equal; both near PEFT's merge. Returns the worst relative difference to
    PEFT's over the adapted tensors."""
    import torch
    from safetensors import safe_open

    v = res["verification"]
    assert res["tensors_merged"] == n_adapted, res
    assert v["passed"] and v["layers"]["checked"] == n_adapted and v["read_back"]["problems"] == [], v
    plain = dict(_tensors(tmp / "prefopt-noverify"))
    peft_index = tmp / "peft" / "model.safetensors.index.json"
    where = json.loads(peft_index.read_text())["weight_map"] if peft_index.is_file() else None
    worst, n = 0.0, 0
    for k, t in _tensors(tmp / "prefopt"):
        assert torch.equal(t, plain.pop(k)), f"{k}: the verified merge wrote another tensor than the plain merge"
        if k.endswith("proj.weight"):
            with safe_open(str(tmp / "peft" / (where[k] if where else "model.safetensors")), framework="pt") as f:
                ref = f.get_tensor(k).float()
            worst = max(worst, ((t.float() - ref).abs().max() / ref.abs().max()).item())
            n += 1
    assert not plain and n == n_adapted, (len(plain), n)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="runs of each merge, alternating order (medians reported)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=400)
    ap.add_argument("--workdir", default=None, help="where to write the model (default: a temp folder)")
    args = ap.parse_args()
    from statistics import median

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        total = make_model(tmp / "base", layers=args.layers, hidden=args.hidden, inter=args.inter, vocab=args.vocab,
                           shard_mb=args.shard_mb)
        make_adapter(tmp / "base", tmp / "adapter", layers=args.layers, hidden=args.hidden, inter=args.inter)
        n_shards = len(list((tmp / "base").glob("*.safetensors")))
        print(f"base: {total / 2**30:.2f} GiB bf16 in {n_shards} shards (made in {time.perf_counter() - t0:.0f} s); "
              f"DoRA r=16 on {7 * args.layers} linear layers; {args.reps} reps, order alternating", flush=True)
        jobs = [("prefopt", PREFOPT, "verify"), ("prefopt-noverify", PREFOPT, "no-verify"), ("peft", PEFT, "")]
        runs: dict[str, list[dict]] = {who: [] for who, _, _ in jobs}
        worst = 0.0
        for rep in range(args.reps):
            for who, code, mode in jobs[rep % 3:] + jobs[:rep % 3]:
                r = _run(who, code, mode, tmp)
                runs[who].append(r)
                split = r.get("time_s") or {}
                print(f"  rep {rep + 1} {who:16s} wall {r['wall']:6.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB"
                      + (f"  (merge {split['merge']} s, verification {split['verification']} s)" if split else ""),
                      flush=True)
            worst = max(worst, _check_work(tmp, runs["prefopt"][-1], 7 * args.layers))
        med = {who: {k: median(r[k] for r in rs) for k in ("wall", "peak_rss_mb")} for who, rs in runs.items()}
        peft = med["peft"]
        split = {k: median(r["time_s"][k] for r in runs["prefopt"]) for k in ("merge", "verification")}
        v = runs["prefopt"][-1]["verification"]
        print(f"\n| {total / 2**30:.2f} GiB bf16, DoRA r=16 | wall (median) | peak RSS (median) | wall / PEFT "
              "| RSS / PEFT |\n| --- | --- | --- | --- | --- |")
        for who, label in (("peft", "PEFT load-then-merge"), ("prefopt-noverify", "prefopt merge, verification off"),
                           ("prefopt", "prefopt merge, default (verified)")):
            m = med[who]
            print(f"| {label} | {m['wall']:.1f} s | {m['peak_rss_mb']:,.0f} MiB | {m['wall'] / peft['wall']:.2f} "
                  f"| {m['peak_rss_mb'] / peft['peak_rss_mb']:.2f} |")
        print(f"\ndefault merge's time split (median): merge {split['merge']:.1f} s, verification "
              f"{split['verification']:.1f} s; verification: passed, {v['layers']['checked']} layers checked (worst "
              f"relative difference {v['layers']['max_rel_diff']:.2e}, limit {v['layers']['limit']:.3g}), logits on "
              f"{v['tokens']} tokens: max rel diff {v['max_rel_logit_diff']:.3g}, mean KL {v['mean_kl']:.2e}, top-1 "
              f"{v['top1_agreement']:.3f}; read-back clean")
        print(f"targets: verified wall / PEFT {med['prefopt']['wall'] / peft['wall']:.3f} (<= 1.0), peak RSS / PEFT "
              f"{med['prefopt']['peak_rss_mb'] / peft['peak_rss_mb']:.3f} (<= 0.35)")
        print(f"checked: the verified and unverified checkpoints are equal bit for bit; worst relative difference "
              f"to PEFT's merge over the {7 * args.layers} adapted tensors: {worst:.2e}")


if __name__ == "__main__":
    main()
