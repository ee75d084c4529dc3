"""prefopt's streaming merge vs PEFT's load-then-merge_and_unload, side by side, on a locally generated
random Llama of about 2 GB (bf16) in several shards, with a DoRA adapter (r=16, all linear layers).

    python scripts/bench_merge.py [--layers 16] [--hidden 2048] [--shard-mb 400]

Each merge runs in its own fresh process that reports its own peak RSS (VmHWM; see peak_rss_mb): prefopt's default
merge (verification on, as `prefopt merge` runs it), prefopt's merge with verification off, and PEFT's load-then-merge.
Prints the peak RSS ratios (target for the default: <= 0.35 of PEFT's) and wall-time ratios, and checks the outputs
agree.
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
print(json.dumps({"wall": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                  "verification": {k: v.get(k) for k in ("passed", "max_rel_logit_diff", "mean_kl",
                                                         "top1_agreement")}}))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=400)
    ap.add_argument("--workdir", default=None, help="where to write the model (default: a temp folder)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        total = make_model(tmp / "base", layers=args.layers, hidden=args.hidden, inter=args.inter, vocab=args.vocab,
                           shard_mb=args.shard_mb)
        make_adapter(tmp / "base", tmp / "adapter", layers=args.layers, hidden=args.hidden, inter=args.inter)
        n_shards = len(list((tmp / "base").glob("*.safetensors")))
        print(f"base: {total / 2**30:.2f} GiB bf16 in {n_shards} shards (made in {time.perf_counter() - t0:.0f} s)")
        res = {}
        runs = (("prefopt", PREFOPT, "verify"), ("prefopt-noverify", PREFOPT, "no-verify"), ("peft", PEFT, ""))
        for who, code, mode in runs:
            proc = subprocess.run([sys.executable, "-c", code, str(tmp / "adapter"), str(tmp / "base"), str(tmp / who),
                                   mode], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{who} failed:\n{proc.stderr[-3000:]}")
            res[who] = json.loads(proc.stdout.strip().splitlines()[-1])
            extra = f"   verification {res[who]['verification']}" if mode == "verify" else ""
            print(f"{who:16s} wall {res[who]['wall']:6.1f} s   peak RSS {res[who]['peak_rss_mb']:7.0f} MB{extra}",
                  flush=True)
        # the two merges agree (both bf16 output; PEFT merges in the weight dtype, prefopt in fp32)
        worst = 0.0
        peft_index = tmp / "peft" / "model.safetensors.index.json"
        idx = json.loads(peft_index.read_text())["weight_map"] if peft_index.is_file() else None
        for f in sorted((tmp / "prefopt").glob("model*.safetensors")):
            ours = load_file(str(f))
            for k, t in ours.items():
                if ".layers.0." in k and k.endswith("proj.weight"):
                    ref = load_file(str(tmp / "peft" / (idx[k] if idx else "model.safetensors")))[k]
                    worst = max(worst, ((t.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
        peft = res["peft"]
        print(f"peak RSS ratio, default prefopt merge (verified) / peft: "
              f"{res['prefopt']['peak_rss_mb'] / peft['peak_rss_mb']:.3f} (target <= 0.35)")
        print(f"peak RSS ratio, verification off / peft: "
              f"{res['prefopt-noverify']['peak_rss_mb'] / peft['peak_rss_mb']:.3f}")
        print(f"wall-time ratio, default (verified) / peft: {res['prefopt']['wall'] / peft['wall']:.3f}; "
              f"verification off / peft: {res['prefopt-noverify']['wall'] / peft['wall']:.3f}")
        print(f"layer-0 max relative difference between the two merged checkpoints: {worst:.2e}")
        del torch


if __name__ == "__main__":
    main()
