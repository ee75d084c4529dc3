"""The memory plan: each stage's peak accelerator memory, by component, from the model's config alone.

Pure arithmetic on the shapes `AutoConfig` gives (parameters are counted on a weightless meta-device copy), the
recipe's model, adapter and train sections and the stage type. Every term says where its bytes come from; the
measured accuracy (scripts/measure_memory.py, tests/test_memory.py) is in docs/benchmarks.md (memory plan).

The peak of a training step is the larger of two moments, on top of what lives the whole stage (base weights,
adapter, its gradients, optimizer state from the second step on): the LM head's backward, with everything autograd
saved in the forward still live; or, under gradient checkpointing, one decoder layer recomputed with its saved set
and the gradients in flight. (DPO's reference forward runs under no_grad after the policy's forward, below both.)
"""

from __future__ import annotations

import dataclasses
import math

from .errors import PrefoptError
from .models import empty_model, load_config

GiB = 2**30
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes' 4-bit blocks and double-quant blocks (of absmax values)
LOGIT_TOKENS, LOGIT_VOCAB = 4096, 32768  # TRL's fused LM head tile (tokens x vocabulary), trl.kernels.chunked_logprob
CPU_TILE_TEMPS = 4  # torch fallback of the tile kernels: z, p, grad and a product live at once
OPTIMIZER_BYTES = {"8bit": 2, "adafactor": 4, "sgd": 4}  # per trainable parameter; everything else: AdamW-like, 8


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a decoder-only model: per-layer widths and parameter counts."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # key/value heads x head_dim
    heads: int
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of every nn.Linear in the decoder layers
    other_params: int  # embeddings, LM head, norms: kept unquantized


def model_shape(path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model at `path` (folder or hub id), read from its config; no weights are loaded."""
    import torch

    cfg = load_config(path, revision=revision, trust_remote_code=trust_remote_code)
    model = empty_model(cfg, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    linears, in_linears = [], 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            linears.append((name, mod.in_features, mod.out_features))
            in_linears += mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
    total = sum(p.numel() for p in model.parameters())
    tc = cfg.get_text_config()
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    return ModelShape(vocab=tc.vocab_size, hidden=tc.hidden_size, intermediate=getattr(tc, "intermediate_size", 0)
                      or 4 * tc.hidden_size, layers=tc.num_hidden_layers, q_dim=heads * head_dim,
                      kv_dim=kv_heads * head_dim, heads=heads, linears=tuple(linears), other_params=total - in_linears)


def _targeted(name: str, target_modules) -> bool:
    return target_modules == "all-linear" or name.rsplit(".", 1)[-1] in set(target_modules)


def _weights(shape: ModelShape, quantization: str, wbytes: int) -> int:
    """Base weights: the decoder's linears as quantized, everything else (embeddings, head, norms) in `dtype`."""
    n = sum(i * o for _, i, o in shape.linears)
    if quantization == "nf4":  # 4 bits + one uint8 absmax per 64 (double quant) + one fp32 per 256 absmax
        q = n // 2 + math.ceil(n / NF4_BLOCK) + 4 * math.ceil(n / NF4_BLOCK / NF4_BLOCK2)
    elif quantization == "int8":  # int8 + an fp32 scale per output row
        q = n + 4 * sum(o for _, _, o in shape.linears)
    else:
        q = n * wbytes
    return q + shape.other_params * wbytes


def _optimizer_bytes(optim: str) -> int:
    for key, b in OPTIMIZER_BYTES.items():
        if key in optim:
            return b
    return 8  # AdamW: exp_avg + exp_avg_sq in fp32


ATTN_INPUT, MLP_INPUT = {"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}  # linears sharing one input


def _layer_saved(shape: ModelShape, adapted: list[tuple[str, int, int]], r: int, e: int, u: int,
                 dropout: bool) -> int:
    """Bytes autograd saves per token in one decoder layer (Llama-style: RMSNorms, attention through SDPA, gated MLP;
    prefopt's DoRA/LoRA layer on the `adapted` (name, in, out) linears). Checked tensor by tensor with
    saved_tensors_hooks on the test models: exact for every layer but the first (whose input needs no gradient)."""
    h, f, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    # RMSNorm x2: its fp32 input and rsqrt; SDPA: RoPE'd q and k, v, output, logsumexp; MLP: gate, silu(gate), up
    out = 2 * (h * 4 + 4) + (2 * q + 2 * kv) * e + shape.heads * 4 + 3 * f * e
    inputs = {}
    for name, i, o in adapted:
        short = name.rsplit(".", 1)[-1]
        # each adapted linear keeps A x (r) and the unscaled sum base(x)/s + B A x (o; fp32 under autocast) for the
        # magnitude's gradient, and its input: with adapter dropout on, its own dropped-out copy and the mask (both
        # the input's size); without, the input itself, one tensor for linears that share it (q/k/v, gate/up)
        out += r * e + o * u
        key = name if dropout else ("attn" if short in ATTN_INPUT else "mlp" if short in MLP_INPUT else name)
        inputs[key] = i * (2 * e if dropout else e)
    return out + sum(inputs.values())


def _one_layer(shape: ModelShape) -> tuple[tuple[str, int, int], ...]:
    """The (name, in, out) linears of one decoder layer (the first; Llama-style layers are alike)."""
    return shape.linears[: len(shape.linears) // max(shape.layers, 1)]


def _weight_casts(shape: ModelShape, quantization: str, dtype: str, device: str) -> int:
    """Bytes of one decoder layer's weight copies kept for the backward: an unquantized fp32 or fp16 base under the
    GPU's bf16 autocast keeps the bf16 copy of each Linear's weight autocast made (autograd does for a plain Linear
    whose input needs a gradient; prefopt's DoRA node keeps the same copy). None on the CPU (no autocast), for a
    bf16 or quantized base. (An upper bound: layer 0's q/k/v inputs need no gradient, and FSDP's or DeepSpeed's own
    mixed precision makes no autocast copies.)"""
    if device == "cpu" or dtype == "bfloat16" or quantization != "none":
        return 0
    return 2 * sum(i * o for _, i, o in _one_layer(shape))


# none: every device holds everything (one device, DDP). DeepSpeed ZeRO-3 is not modelled: its own buffers sit
# above this arithmetic (docs/scaling.md, docs/benchmarks.md)
SHARDINGS = ("none", "fsdp", "zero2")


def _layer_weights(shape: ModelShape, quantization: str, wbytes: int) -> int:
    """One decoder layer's base weights (what FSDP / ZeRO-3 gather at a time), as quantized."""
    per = _one_layer(shape)
    one = dataclasses.replace(shape, linears=tuple(per), other_params=0)
    return _weights(one, quantization, wbytes) + 2 * shape.hidden * wbytes  # + its two norms


def estimate_stage(shape: ModelShape, *, stage_type: str, quantization: str, dtype: str, adapter, train,
                   reference: str | None = None, disable_dropout: bool = True, device: str = "cuda",
                   gpus: int = 1, sharding: str = "none") -> dict:
    """Peak bytes of one stage on one device: what is live at the peak, by component.

    `adapter` and `train` are the recipe's AdapterSection and TrainSection (or anything with the same fields);
    `reference` (DPO) is "previous_stage" (TRL's frozen "ref" copy of the adapter, run under no_grad) or "base"
    (the adapter disabled). precompute_ref_log_probs does not enter: the "ref" copy stays (it computes them) and the
    reference forward it saves is below the peak (measured: the same peak). `disable_dropout`: the preference
    trainers' default (TRL turns adapter dropout off; SFT keeps it). `device` "cpu" trains in the model's dtype
    (what the CPU tests measure); on "cuda" prefopt trains under bf16 autocast. With `gpus` > 1 (data parallel)
    every device runs its own per-device batch; `sharding` says what it holds:
    - "none" (DDP): everything, plus DDP's gradient buckets;
    - "zero2": the optimizer state and gradients are divided over the devices;
    - "fsdp": the adapter, its gradients and optimizer state and the base weights too, plus what is gathered
      whole at a time: two decoder layers (the one computing and the next, prefetched) and the root's embeddings,
      LM head and final norm (FSDP2 keeps the root unsharded through the step).
    Each process loads the whole base before it is sharded, so the peak is never below the whole base weights
    (`load_bytes`)."""
    wbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    # activations' element size: the model's dtype on CPU; bf16 under the GPU's autocast (TRL's bf16=True)
    e = wbytes if device == "cpu" else 2
    u = 4  # DoRA's unscaled sum: in the fp32 adapter's dtype, and summed in fp32 under autocast
    preference = stage_type in ("dpo", "orpo", "simpo")  # chosen + rejected: two sequences per row
    # TRL's preference trainers (KTO too) turn dropout off unless disable_dropout: false; KTO's KL forward is no-grad
    dropout = adapter.dropout > 0 and not (stage_type != "sft" and disable_dropout)
    adapted = [(n, i, o) for n, i, o in shape.linears if _targeted(n, adapter.target_modules)]
    r, per_layer = adapter.r, adapted[: len(adapted) // max(shape.layers, 1)]
    trainable = sum(r * (i + o) + (o if adapter.method == "dora" else 0) for _, i, o in adapted)
    norms = sum(o for _, _, o in adapted) * 8 if adapter.method == "dora" else 0  # DoRA's cached ||W||^2, 1/norm
    seqs = train.batch_size * (2 if preference else 1)  # chosen + rejected in one batch
    tokens = seqs * train.max_length
    h = shape.hidden
    layer = tokens * _layer_saved(shape, per_layer, r, e, u, dropout)
    # gradient checkpointing keeps each layer's input (and the final norm's); otherwise every layer's saved set
    final_norm = tokens * h * 4
    casts = _weight_casts(shape, quantization, dtype, device)
    kept = tokens * h * e * shape.layers if train.gradient_checkpointing else (layer + casts) * shape.layers
    kept += final_norm
    layer += casts  # (with checkpointing: the layer recomputed holds its copies)
    head_tokens = seqs * (train.max_length - 1)
    if stage_type in ("sft", "dpo", "kto"):
        # TRL's fused LM head: the final hidden states it saves and their fp32 gradient, and its logit tile buffer,
        # (tokens x 32768 columns whatever the vocabulary); without Triton (CPU) the tile math runs as torch ops
        # with a few fp32 temporaries of the tile's used columns
        rows = min(head_tokens, LOGIT_TOKENS)
        head = head_tokens * h * (e + 4) + rows * LOGIT_VOCAB * e
        if device == "cpu":
            head += CPU_TILE_TEMPS * rows * min(shape.vocab, LOGIT_VOCAB) * 4
    else:  # ORPO / CPO (SimPO) materialise the logits, an fp32 log-softmax and its gradient (not measured)
        head = head_tokens * shape.vocab * (e + 8)
    # the peak: the LM head's backward on top of everything saved, or (with checkpointing) one layer recomputed
    # with its saved set and the gradients in flight; the reference forward (policy saved + its head) is lower
    in_flight = tokens * (2 * h + 2 * max(h, shape.intermediate, shape.q_dim)) * e
    recompute = layer + in_flight if train.gradient_checkpointing else 0
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    n = max(gpus, 1)
    whole = _weights(shape, quantization, wbytes)
    params = n if sharding == "fsdp" else 1  # what divides the weights, the adapter and its "ref" copy
    state = n if sharding != "none" else 1  # what divides gradients and optimizer state
    weights = whole
    if params > 1:  # the shards, plus what is gathered whole at a time (two layers, the root's modules)
        root = shape.other_params * wbytes - 2 * shape.hidden * wbytes * shape.layers
        weights = whole // n + 2 * _layer_weights(shape, quantization, wbytes) + max(root, 0)
    comp = {
        "base_weights": weights,
        "adapter": trainable * 4 // params + norms,  # fp32: prefopt keeps the trainable adapter so (stages.common)
        "gradients": trainable * 4 * (2 if gpus > 1 and sharding == "none" else 1) // state,  # + DDP's buckets
        "optimizer": trainable * _optimizer_bytes(train.optim) // state,
        # TRL's frozen "ref" copy of the adapter (with precompute too: it computes the log-probs)
        "reference": trainable * 4 // params + norms if stage_type in ("dpo", "kto") and reference == "previous_stage"
        else 0,
        "activations": kept + recompute if recompute > head else kept,
        "logits": 0 if recompute > head else head,
    }
    return {"components": comp, "peak_bytes": max(sum(comp.values()), whole), "load_bytes": whole,
            "tokens": tokens, "sequence_length": train.max_length, "adapter_dropout": dropout}


# ---------------------------------------------------------------------------------------------- the plan


def parse_size(text: str | int) -> int:
    """'24GB' / '24G' (10^9 bytes), '24GiB' (2^30), '512MiB', '80e9' or a number of bytes -> bytes."""
    import re

    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
             "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:[eE]\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise PrefoptError(f"--gpu-memory: '{text}' is not a size; give e.g. 24GB, 24GiB, 80G or a number of bytes")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def stage_settings(stage) -> dict:
    """The values of one recipe stage the estimate reads (the stage section itself is not passed on)."""
    length = stage.effective_max_length()  # trainer_kwargs.max_length counts, as in the trainer
    train = stage.train.model_copy(update={"max_length": length}) if isinstance(length, int) else stage.train
    return {"name": stage.name, "type": stage.type, "train": train,
            "reference": getattr(stage, "reference", None),
            "disable_dropout": bool(stage.trainer_kwargs.get("disable_dropout", True))}


def _estimate(shape, s: dict, common: dict, **train_changes) -> dict:
    train = s["train"].model_copy(update=train_changes) if train_changes else s["train"]
    return estimate_stage(shape, stage_type=s["type"], train=train, reference=s["reference"],
                          disable_dropout=s["disable_dropout"], **common)


def suggestions(shape, s: dict, common: dict, budget: int, index: int) -> list[dict]:
    """The nearest settings that fit `budget`: each one change (or checkpointing plus one change), with its peak
    and the --set overrides that make it. Effective batch (batch_size x grad_accum) is kept where batch changes.
    precompute_ref_log_probs is never among them: it does not lower the peak (see estimate_stage)."""
    t = s["train"]
    key = f"stages.{index}.train"
    out = []

    def add(changes: dict, note: str):
        peak = _estimate(shape, s, common, **changes)["peak_bytes"]
        if peak <= budget:
            out.append({"set": {f"{key}.{k}": v for k, v in changes.items()}, "peak_bytes": peak, "note": note})
            return True
        return False

    for gc in ([False, True] if not t.gradient_checkpointing else [False]):
        base = {"gradient_checkpointing": True} if gc else {}
        head = "gradient_checkpointing on" + (", " if gc else "")
        if gc and add(base, "gradient_checkpointing on"):
            continue  # checkpointing alone fits: the combinations below only cost more steps
        bs = t.batch_size
        while bs > 1:
            bs //= 2
            ga = -(-t.batch_size * t.grad_accum // bs)
            if add({**base, "batch_size": bs, "grad_accum": ga},
                   (head if gc else "") + f"batch_size {bs} x grad_accum {ga} (same effective batch)"):
                break
        length = (t.max_length - 1) // 64 * 64
        while length >= 64:
            if add({**base, "max_length": length}, (head if gc else "") + f"max_length {length} (longer rows cut)"):
                break
            length -= 64
    return sorted(out, key=lambda x: -x["peak_bytes"])[:4]


def memory_plan(shape: ModelShape, *, quantization: str, dtype: str, adapter, stages: list[dict],
                gpu_memory: int | None = None, gpus: int = 1, device: str = "cuda", sharding: str = "none") -> dict:
    """The plan of every stage (`stages` from stage_settings): components in bytes, peak, fits, suggestions."""
    common = dict(quantization=quantization, dtype=dtype, adapter=adapter, device=device, gpus=gpus,
                  sharding=sharding)
    out = []
    for i, s in enumerate(stages):
        est = _estimate(shape, s, common)
        fits = None if gpu_memory is None else est["peak_bytes"] <= gpu_memory
        out.append({"stage": s["name"], "type": s["type"], **est, "fits": fits,
                    "suggestions": suggestions(shape, s, common, gpu_memory, i) if fits is False else []})
    return {"device": device, "gpus": gpus, "sharding": sharding, "gpu_memory_bytes": gpu_memory,
            "sequence_length": "max_length (every sequence at the cut: the worst case)", "stages": out}


def format_plan(plan: dict) -> list[str]:
    """The human table: one row per stage, components and peak in GiB (MiB for small models), fit and fixes."""
    big = max((st["peak_bytes"] for st in plan["stages"]), default=0) >= GiB
    unit, div = ("GiB", GiB) if big else ("MiB", 2**20)
    names = ["base_weights", "adapter", "gradients", "optimizer", "reference", "activations", "logits"]
    heads = ["weights", "adapter", "grads", "optim", "ref", "activ", "logits", "peak"]
    budget = plan["gpu_memory_bytes"]
    shard = "" if plan.get("sharding", "none") == "none" else f", {plan['sharding']}"
    lines = [f"# memory plan ({unit} per device, {plan['device']}, {plan['gpus']} device(s){shard}; sequences at "
             "max_length)",
             f"    {'stage':18}" + "".join(f"{h:>9}" for h in heads)
             + (f"  fits {budget / 1e9:.3g} GB" if budget else "")]
    for st in plan["stages"]:
        vals = [st["components"][n] for n in names] + [st["peak_bytes"]]
        fit = "" if st["fits"] is None else ("  yes" if st["fits"] else "  NO")
        lines.append(f"    {st['stage'][:18]:18}" + "".join(f"{v / div:9.2f}" for v in vals) + fit)
        if st["peak_bytes"] > sum(st["components"].values()):
            lines.append(f"      the peak is the load: each process holds the whole base ({st['load_bytes'] / div:.2f} "
                         f"{unit}) before it is sharded")
        for sug in st["suggestions"]:
            sets = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sug["set"].items())
            lines.append(f"      fits with {sug['note']}: peak {sug['peak_bytes'] / div:.2f} {unit}  ({sets})")
        if st["fits"] is False and not st["suggestions"]:
            lines.append("      nothing near fits: the whole base must fit one device while it loads; a smaller "
                         "model or "
                         "a larger device" if budget is not None and st["load_bytes"] > budget else
                         "      nothing near fits: a quantized base (model.quantization: nf4), a smaller model or a "
                         "larger device")
    if budget is None:
        lines.append("    (give --gpu-memory, e.g. 24GB, to check the fit)")
    return lines


def recipe_memory_plan(recipe, *, gpu_memory: int | None = None, gpus: int = 1, device: str = "cuda",
                       sharding: str = "none") -> dict:
    """`memory_plan` for a recipe's model and stages."""
    m = recipe.model
    try:
        shape = model_shape(recipe.model_path(), revision=m.revision, trust_remote_code=m.trust_remote_code)
    except OSError as e:
        raise PrefoptError(f"model.name_or_path: cannot read the config of '{m.name_or_path}' for the memory plan: "
                           f"{str(e).splitlines()[0]}") from None
    return memory_plan(shape, quantization=m.quantization, dtype=m.dtype, adapter=recipe.adapter,
                       stages=[stage_settings(st) for st in recipe.stages], gpu_memory=gpu_memory, gpus=gpus,
                       device=device, sharding=sharding)
