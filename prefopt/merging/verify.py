"""Does the merged checkpoint behave like the adapter model prefopt trained? Compared on probe prompts, on the
model's device, in bounded memory.

Neither model is ever whole in memory. Each is built weightless (meta device) and run block by block: a
forward pre-hook reads one block's weights (one decoder layer, the final norm) from the safetensors shards
onto the device, and a forward hook frees them again; the input embedding is read row by row for the probe
tokens only. Only the final hidden states of the probe tokens are kept; logits are computed from them with
the output head read in slices of the vocabulary. Peak memory is about one decoder layer (in fp32) plus the
hidden states, whatever the model's size.

The reference is the forward prefopt trained with: the base as the training saw it (each quantized linear
weight put through the same NF4/int8 round trip, which is what bitsandbytes' layer computes with) plus the
adapter, with prefopt's fast DoRA forward when the adapter is DoRA and dora_impl was fast. PEFT's own forward
is run too and reported beside it (`peft_forward`) when the two can differ.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..config import AdapterSection, defaults
from ..models import Residual, empty_model, initial_adapter, load_config, load_tokenizer
from ..quant import roundtrip, torch_dtype
from .heap import release_freed_memory

_ADAPTER = defaults(AdapterSection)
FIXED_PROBES = [
    "Tell me about the sea.",
    "What do you think of a garden?",
    "Explain why the sky is blue in one sentence.",
    "Write a short poem about autumn.",
    "List three uses of a paperclip.",
    "Describe a quiet library.",
]


def device():
    """Where verification runs: the GPU when there is one (as in training), else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Shards:
    """Tensors of a safetensors folder, read one at a time (memory-mapped; nothing kept)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            path = folder / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self.where = {k: path for k in f.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str):
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as f:
            return f.get_tensor(key)


def probe_texts(tokenizer, rows: list[dict] | None, n: int = 16) -> tuple[list[str], str]:
    """Probe texts and where they came from ("held-out rows" or "fixed prompts")."""
    texts = []
    for row in (rows or [])[:n]:
        if "messages" in row:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif "prompt" in row:
            prompt, chosen = row["prompt"], row.get("chosen")
            if isinstance(prompt, list):
                texts.append(tokenizer.apply_chat_template(prompt + (chosen or []), tokenize=False))
            else:
                texts.append(prompt + (chosen or ""))
        elif "text" in row:
            texts.append(row["text"])
    if texts:
        return texts, "held-out rows"
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in FIXED_PROBES], "fixed prompts"


# ---------------------------------------------------------------------------------------------- streaming


def _empty(config_dir: Path, dtype):
    """The merged model's skeleton, weightless (meta device), in eval mode, without a KV cache."""
    cfg = load_config(str(config_dir))
    cfg.use_cache = False
    return empty_model(cfg, dtype=dtype).eval()


def _prefix_of(root, module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("module not found in its model")


def _units(root, decoder):
    """The smallest modules that run as one and own weights the checkpoint holds: each linear layer (a PEFT
    layer together with its base_layer, since fast DoRA reads the base weight itself), each norm; each with its
    checkpoint prefix. The input embedding is left out (its rows are read directly, see Matrix.rows)."""
    names = {m: n for n, m in root.named_modules()}
    skip = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    seen = []
    for m in decoder.modules():
        if m is skip or not any(p.device.type == "meta" for p in m.parameters(recurse=False)):
            continue
        name = names[m]
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = root.get_submodule(parent_name) if parent_name else root
        unit = parent if getattr(parent, "base_layer", None) is m else m
        if unit not in seen:
            seen.append(unit)
    return [(u, f"{names[u]}." if names[u] else "") for u in seen]


def _checkpoint_key(prefix: str, param_name: str) -> str:
    # PEFT wraps an adapted Linear as <name>.base_layer
    return (prefix + param_name).replace(".base_layer.", ".")


@contextmanager
def streamed(root, decoder, load):
    """Hooks that bring each unit's meta parameters in through `load(key, owner_module)` just before the unit
    runs, and drop them right after: one linear layer's weight in memory at a time."""
    from accelerate.utils import set_module_tensor_to_device

    handles = []
    for unit, prefix in _units(root, decoder):
        names = [n for n, p in unit.named_parameters() if p.device.type == "meta"]

        def pre(mod, args, kwargs, names=names, prefix=prefix):
            for n in names:
                owner = mod.get_submodule(n.rsplit(".", 1)[0]) if "." in n else mod
                value = load(_checkpoint_key(prefix, n), owner)
                set_module_tensor_to_device(mod, n, value.device, value=value)
            for m in mod.modules():  # fast DoRA caches ||W||^2 by the weight tensor's identity: start clean
                m.__dict__.pop("_prefopt_w2", None)
                for plan in m.__dict__.get("_prefopt_plans", {}).values():
                    plan.key = None

        def post(mod, args, kwargs, output, names=names):
            big = sum(mod.get_parameter(n).numel() for n in names) >= (1 << 22)
            for n in names:
                set_module_tensor_to_device(mod, n, "meta")
            for m in mod.modules():
                m.__dict__.pop("_prefopt_w2", None)
            if big:  # hand large freed blocks back to the OS, so peak RSS is one layer, not the heap's high mark
                release_freed_memory()
            return output

        handles.append(unit.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(unit.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _to_device(model, dev) -> None:
    """Everything already materialised (adapter tensors, rotary buffers) onto the device; meta stays meta."""
    for p in model.parameters():
        if p.device.type != "meta" and p.device != dev:
            p.data = p.data.to(dev)
    for mod in model.modules():
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.device.type != "meta" and b.device != dev:
                setattr(mod, name, b.to(dev))  # (a registered buffer: nn.Module keeps it one)


class Matrix:
    """A 2-D weight in the shards, read a slice of rows at a time (the embedding, the output head): never whole."""

    def __init__(self, shards: Shards, key: str, cast):
        from safetensors import safe_open

        self.path, self.key, self.cast = str(shards.where[key]), key, cast
        with safe_open(self.path, framework="pt") as f:
            self.shape = tuple(f.get_slice(key).get_shape())

    def __getitem__(self, rows: slice):
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return self.cast(f.get_slice(self.key)[rows])

    def rows(self, ids):
        """The rows of these token ids, read one by one from the memory-mapped file."""
        import torch
        from safetensors import safe_open

        uniq = sorted(set(ids.flatten().tolist()))
        with safe_open(self.path, framework="pt") as f:
            sl = f.get_slice(self.key)
            table = self.cast(torch.cat([sl[i:i + 1] for i in uniq]))
        where = {t: j for j, t in enumerate(uniq)}
        index = torch.tensor([where[t] for t in ids.flatten().tolist()], device=table.device)
        return table[index].reshape(*ids.shape, table.shape[-1])


def final_hidden(root, decoder, enc, load, embed: Matrix):
    """Final hidden states (after the decoder's last norm) of the probe tokens; the input embeddings are read
    row by row for the tokens present, every other block streamed."""
    import torch

    embeds = embed.rows(enc["input_ids"])
    with streamed(root, decoder, load), torch.no_grad():
        out = decoder(inputs_embeds=embeds, attention_mask=enc["attention_mask"], use_cache=False)
    return out.last_hidden_state.float()


def _key_of(root, module) -> str:
    return _prefix_of(root, module) + "weight"


def _head_key(root, shards: Shards) -> str:
    key = _key_of(root, root.get_output_embeddings())
    if key in shards:
        return key
    return _key_of(root, root.get_input_embeddings())  # tied embeddings: the head is the embedding matrix


# ---------------------------------------------------------------------------------------------- the two models


def _load_adapter(model, adapter_dir: Path, dev) -> None:
    """The adapter's tensors into a PeftModel built on a weightless base (PEFT leaves them on meta there)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    for key, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
            if key.endswith(part):
                stem = key[: -len(part)] + part.replace(".weight", "")
                name = f"{stem}.default.weight"
                break
        else:
            name = key
        if name not in params:
            raise KeyError(f"adapter tensor {key} has no place in the model ({name})")
        set_module_tensor_to_device(model, name, dev, value=t)


def adapter_hiddens(adapter_dir: Path, info: dict, base_dir: Path, enc, dev, *, dora_impl: str, dora_dropout: str):
    """Final hidden states of the adapter model as trained (and under PEFT's forward, when that can differ)."""
    import torch
    from peft import PeftModel

    dtype = torch_dtype(info["dtype"])
    quantized = info["quantization"] != "none"
    shards = Shards(base_dir)
    # The weights are exactly the trained ones (rounded to the training dtype, or through the quantization round
    # trip); the arithmetic is fp32 on both sides, so what is measured is the merge, not bf16 compute noise.
    base = _empty(base_dir, torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), low_cpu_mem_usage=True).eval()
    _load_adapter(model, adapter_dir, dev)
    _to_device(model, dev)
    root = model.get_base_model()
    decoder = root.get_decoder()

    initial = initial_adapter(adapter_dir)
    residual = Residual(initial) if initial is not None else None

    def load(key, owner):
        t = shards.get(key).to(dev)
        if quantized and isinstance(owner, torch.nn.Linear) and t.dim() == 2:
            return roundtrip(t, info)  # the values the quantized layer computes with
        if residual is not None:  # a base-rewriting init (pissa, olora): the rewritten base, as trained
            t = residual.apply(key, t, dtype)
        return t.to(dtype).to(torch.float32)

    def as_trained(t):  # embedding and head stay unquantized, in the training dtype
        return t.to(dev).to(dtype).to(torch.float32)

    embed = Matrix(shards, _key_of(base, base.get_input_embeddings()), as_trained)
    head = Matrix(shards, _head_key(base, shards), as_trained)
    out = {}
    use_dora = bool(model.peft_config["default"].use_dora)
    if use_dora:
        from ..dora.forward import guard_peft_norms

        guard_peft_norms(model)  # base rows of norm 0: PEFT's forward as prefopt trains it (scale 0, not NaN)
    if use_dora and dora_impl == "fast":
        from ..dora.forward import disable_fast_dora, enable_fast_dora

        enable_fast_dora(model, dora_dropout)
        out["trained"] = final_hidden(root, decoder, enc, load, embed)
        disable_fast_dora(model)
        out["peft"] = final_hidden(root, decoder, enc, load, embed)
    else:
        out["trained"] = final_hidden(root, decoder, enc, load, embed)
    return out, head


def merged_hidden(out_dir: Path, enc, dev):
    """Final hidden states of the merged checkpoint, computed in fp32 from its stored weights."""
    import torch

    shards = Shards(out_dir)
    root = _empty(out_dir, torch.float32)
    _to_device(root, dev)

    def fp32(t):
        return t.to(dev, torch.float32)

    embed = Matrix(shards, _key_of(root, root.get_input_embeddings()), fp32)
    hidden = final_hidden(root, root.get_decoder(), enc, lambda key, owner: fp32(shards.get(key)), embed)
    return hidden, Matrix(shards, _head_key(root, shards), fp32)


def compare(h_a, w_a, h_b, w_b, mask) -> dict:
    """max |Δlogit| (absolute and relative to max |logit|), mean KL(a || b), top-1 agreement over the real tokens,
    logits computed from final hidden states and head matrices (Matrix, or tensors) in slices of tokens and of
    the vocabulary: never all tokens x vocab, never a whole head in fp32."""
    import torch

    h_a, h_b = h_a[mask], h_b[mask]
    n, vocab = h_a.shape[0], w_a.shape[0]
    step_t = max(1, (1 << 24) // vocab)
    step_v = max(1, (1 << 26) // (4 * max(1, w_a.shape[1])))
    diff = top = kl_sum = agree = 0.0
    for i in range(0, n, step_t):
        la = torch.cat([h_a[i:i + step_t] @ w_a[v:v + step_v].T for v in range(0, vocab, step_v)], dim=1)
        lb = torch.cat([h_b[i:i + step_t] @ w_b[v:v + step_v].T for v in range(0, vocab, step_v)], dim=1)
        diff = max(diff, (la - lb).abs().max().item())
        top = max(top, la.abs().max().item())
        pa, pb = la.log_softmax(-1), lb.log_softmax(-1)
        kl_sum += (pa.exp() * (pa - pb)).sum(-1).sum().item()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        del la, lb, pa, pb
    return {"tokens": int(n), "max_abs_logit_diff": diff, "max_rel_logit_diff": diff / max(top, 1e-12),
            "mean_kl": kl_sum / max(n, 1), "top1_agreement": agree / max(n, 1)}


def verify(out_dir: Path, adapter_dir: Path, info: dict, base_dir: Path, probe_rows, thresholds, *,
           dora_impl: str = _ADAPTER["dora_impl"], dora_dropout: str = _ADAPTER["dora_dropout"],
           max_length: int = 128) -> dict:
    """The merged model vs the adapter model as trained, on probe prompts; returns the verification report."""
    import gc

    dev = device()
    tok = load_tokenizer(str(out_dir))
    texts, source = probe_texts(tok, probe_rows)
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(dev)
    mask = enc["attention_mask"].bool()
    hiddens, w_a = adapter_hiddens(Path(adapter_dir), info, Path(base_dir), enc, dev, dora_impl=dora_impl,
                                   dora_dropout=dora_dropout)
    gc.collect()
    h_m, w_m = merged_hidden(Path(out_dir), enc, dev)
    metrics = {"probes": len(texts), "probe_source": source, **compare(hiddens["trained"], w_a, h_m, w_m, mask),
               "reference": "prefopt's fast DoRA forward (as trained)" if "peft" in hiddens else "the adapter model"}
    if "peft" in hiddens:
        peft = compare(hiddens["peft"], w_a, h_m, w_m, mask)
        between = compare(hiddens["trained"], w_a, hiddens["peft"], w_a, mask)
        metrics["peft_forward"] = {k: peft[k] for k in ("max_abs_logit_diff", "max_rel_logit_diff", "mean_kl",
                                                        "top1_agreement")}
        metrics["peft_forward"]["max_abs_logit_diff_vs_trained"] = between["max_abs_logit_diff"]
    metrics["device"] = str(dev)
    failures = []  # (written so that a NaN figure fails: every comparison with NaN is False)
    if not metrics["max_rel_logit_diff"] <= thresholds.max_rel_logit_diff:
        failures.append(f"max relative logit diff {metrics['max_rel_logit_diff']:.3g} > "
                        f"{thresholds.max_rel_logit_diff}")
    if not metrics["mean_kl"] <= thresholds.mean_kl:
        failures.append(f"mean KL {metrics['mean_kl']:.3g} > {thresholds.mean_kl}")
    if not metrics["top1_agreement"] >= thresholds.min_top1_agreement:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < {thresholds.min_top1_agreement}")
    return {**metrics, "thresholds": asdict(thresholds), "passed": not failures, "failures": failures}
