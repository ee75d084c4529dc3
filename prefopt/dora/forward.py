"""The fast DoRA forward: PEFT's DoRA layer, exact, without ever building W + s·B·A (the maths, the freshness rule
of the cached norm and the two dropout semantics: docs/dora.md).

This module and ops.py are the DoRA kernel. Besides torch, its one contract with another library is PEFT's LoRA
layer (written against PEFT 0.21; removable only if PEFT's own DoRA forward gets as cheap). It swaps the class of
PEFT's `lora.Linear` / bnb `Linear4bit` / `Linear8bitLt` layers for a subclass with this forward (`_fast_class`),
recognises DoRA by `DoraLinearVariant`, reads the layer's `_active_adapter`, `_disable_adapters`,
`merged_adapters`, `scaling`, its `_modules` (`base_layer`, `lora_A`, `lora_B`, `lora_magnitude_vector`,
`lora_dropout`) and their `_parameters` directly (the hot path: nn.Module.__getattr__ is slow), and casts with
`_cast_input_dtype`. For base rows of norm 0 (`guard_peft_norms`) it also swaps the class of PEFT's DoRA magnitude
layers (`peft.tuners.lora.dora.DoraLinearLayer`, wrapping its `get_weight_norm`, which PEFT's forward and merge divide
by) and of each LoRA layer's `lora_magnitude_vector` ModuleDict (PEFT's variant adds a new adapter's magnitude layer
with `__setitem__`). Every other private API it needs (torch's backward-pass query and hook dicts, accelerate's
hook, bitsandbytes' internals) goes through prefopt._compat. tests/test_dora.py checks
every path against PEFT's own forward.
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn

from .. import _compat
from ..quant import dequantize, harden_4bit_layers
from .ops import DoraLinear, Rows, Shared4bit, inv_norm_s, rows_norm2

DROPOUT_MODES = ("lowrank", "full")
_FAST = "_prefopt_fast_dora"  # class attribute marking a swapped class
_CLASSES: dict[type, type] = {}
# per process: fast forwards taken (of which one-node), PEFT fallbacks, weight norms computed (not from the cache)
STATS = {"fast": 0, "one_node": 0, "fallback": 0, "norms": 0}
_STAMP = "_prefopt_step"  # tensor attribute: the number of the last optimizer step that held this tensor
_OPTIMIZER_STEPS = itertools.count(1)  # numbers the optimizer steps taken in this process
_HOOK: list = []


def _stamp_step(optimizer, args, kwargs) -> None:
    """After every step of every torch optimizer (fused, foreach, bitsandbytes' 8-bit, Adafactor, a user's own
    subclass): stamp its tensors, since fused kernels update them without moving their version counters."""
    n = next(_OPTIMIZER_STEPS)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.__dict__[_STAMP] = n


def _watch_optimizers() -> None:
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_stamp_step))


def _supported_classes() -> tuple[type, ...]:
    from peft.tuners.lora import layer as lora_layer

    classes = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        classes += [c for c in (getattr(lora_bnb, "Linear4bit", None), getattr(lora_bnb, "Linear8bitLt", None)) if c]
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    return tuple(classes)


def _is_dora_variant(variant) -> bool:
    from peft.tuners.lora.variants import DoraLinearVariant

    return type(variant) is DoraLinearVariant or variant is DoraLinearVariant


def _fast_class(cls: type) -> type:
    """A subclass of the PEFT layer class whose forward takes the low-rank path; importable (picklable)."""
    if getattr(cls, _FAST, False):
        return cls
    if cls not in _CLASSES:
        name = f"FastDora{cls.__name__}"
        new = type(name, (cls,), {"forward": _fast_forward, _FAST: True, "_prefopt_peft_class": cls,
                                  "__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, new)
        _CLASSES[cls] = new
    return _CLASSES[cls]


def enable_fast_dora(model: nn.Module, dropout: str = "lowrank") -> int:
    """Route every DoRA Linear layer of a PEFT model through the low-rank forward; returns how many.

    Idempotent; `dropout` ("lowrank" or "full") picks the adapter-dropout semantics. Also keeps
    bitsandbytes' CPU repacking off, which would scramble the dequantized weights the norm is built from.
    """
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")

    harden_4bit_layers(model)
    _watch_optimizers()
    supported = _supported_classes()
    n = 0
    for module in model.modules():
        if not isinstance(module, supported) or not any(_is_dora_variant(v) for v in module.lora_variant.values()):
            continue
        if getattr(module, "fan_in_fan_out", False):
            continue  # PEFT's path handles transposed (Conv1D-style) weights
        module.__class__ = _fast_class(type(module))
        module._prefopt_dora_dropout = dropout
        module._prefopt_plans, module._prefopt_cur = {}, None
        if not _sharded(module.get_base_layer().weight):  # (a ZeRO-3 placeholder has no rows: its forward is PEFT's)
            _base_norm2(module, module.get_base_layer())  # ||W_i||^2 now, from weights nothing has touched yet
        n += 1
    return n


def disable_fast_dora(model: nn.Module) -> int:
    """Put PEFT's own DoRA forward back; returns how many layers were switched."""
    n = 0
    for module in model.modules():
        if getattr(type(module), _FAST, False):
            module.__class__ = type(module)._prefopt_peft_class
            for attr in ("_prefopt_dora_dropout", "_prefopt_plans", "_prefopt_cur", "_prefopt_w2"):
                module.__dict__.pop(attr, None)
            n += 1
    return n


def clear_norm_cache(model: nn.Module) -> None:
    """Forget every cached weight norm. Only needed after writing adapter weights through `.data` outside an
    optimizer (no version counter or optimizer stamp sees such a write), e.g. TRL's copy into DPO's "ref" adapter."""
    for m in model.modules():
        for plan in m.__dict__.get("_prefopt_plans", {}).values():
            plan.key = None


def path_counts() -> dict[str, int]:
    """How many forwards took each path in this process, for tests and benchmarks: `fast` (of which `one_node`, the
    whole layer as one autograd node), `fallback` (PEFT's own forward) and `norms` (weight norms computed, not
    taken from the cache)."""
    return dict(STATS)


def fast_dora_layers(model: nn.Module) -> int:
    """How many layers of `model` take the fast path."""
    return sum(1 for m in model.modules() if getattr(type(m), _FAST, False))


# ---------------------------------------------------------------------------------------------- base rows of norm 0
# (docs/dora.md, "Base rows of norm 0"; the fast path needs nothing here: ops.inv_norm_s gives such rows 0)

_GUARD = "_prefopt_zero_norm_guard"  # class attribute marking a guarded class


def _guarded_weight_norm(self, *args, **kwargs):
    """PEFT's DoRA weight norm with 0 replaced by inf. PEFT divides the magnitude by it (forward and merge), so a
    row of norm 0 gets the scale m / inf = 0 (the row's output is the base's, its gradients 0), not 0 / 0 = NaN;
    every other row's norm is PEFT's, bit for bit."""
    weight_norm = type(self)._prefopt_peft_class.get_weight_norm(self, *args, **kwargs)
    return weight_norm.masked_fill(weight_norm == 0, float("inf"))


def _guarded_setitem(self, key, module) -> None:
    """A DoRA magnitude layer PEFT adds later (TRL's "ref" copy for DPO, any add_adapter) is guarded too. PEFT
    sets it here after its update_layer, so the magnitude's init is PEFT's own (||W_i|| = 0 for such a row)."""
    type(self)._prefopt_peft_class.__setitem__(self, key, module)
    _guard_magnitude(module)


def _guarded_class(cls: type, attrs: dict) -> type:
    """A subclass of `cls` with `attrs`, importable (picklable) from this module, made once."""
    if getattr(cls, _GUARD, False):
        return cls
    if (_GUARD, cls) not in _CLASSES:
        name = f"ZeroNormGuarded{cls.__name__}"
        new = type(name, (cls,), {**attrs, _GUARD: True, "_prefopt_peft_class": cls, "__module__": __name__,
                                  "__qualname__": name})
        setattr(sys.modules[__name__], name, new)
        _CLASSES[(_GUARD, cls)] = new
    return _CLASSES[(_GUARD, cls)]


def _guard_magnitude(module) -> None:
    from peft.tuners.lora.dora import DoraLinearLayer

    if isinstance(module, DoraLinearLayer):
        module.__class__ = _guarded_class(type(module), {"get_weight_norm": _guarded_weight_norm})


def guard_peft_norms(model: nn.Module) -> int:
    """Make PEFT's own DoRA forward and merge safe for base rows of norm 0 on this model's LoRA layers (PEFT itself
    is left alone); returns how many layers. Idempotent. Swaps the class of each DoRA magnitude layer (PEFT's
    `DoraLinearLayer`, whose `get_weight_norm` PEFT divides by) and of each layer's `lora_magnitude_vector` dict,
    so that adapters added later are guarded as well."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        mags = module.lora_magnitude_vector
        mags.__class__ = _guarded_class(type(mags), {"__setitem__": _guarded_setitem})
        for mag in mags.values():
            _guard_magnitude(mag)
        n += 1
    return n


def dora_layers(model: nn.Module):
    """(name, layer) for every PEFT LoRA layer with a DoRA magnitude for one of its active adapters."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and any(a in module.lora_magnitude_vector for a in module.active_adapters):
            yield name, module


def base_norm2(module) -> torch.Tensor | None:
    """||W_i||^2 per output row of a LoRA layer's base weight (fp32, dequantized): the fast path's cached one where
    the layer takes it, else computed now and not kept; None for a weight that is not all here (a ZeRO-3 or FSDP
    shard, the meta device)."""
    base = module.get_base_layer()
    w = base.weight
    if _sharded(w) or w.device.type == "meta":
        return None
    if getattr(type(module), _FAST, False):
        return _base_norm2(module, base)
    with torch.no_grad():
        return rows_norm2(dequantize(base))


# ---------------------------------------------------------------------------------------------- forward


def _weight_key(w: torch.Tensor) -> tuple:
    return (id(w), w.data_ptr(), w._version, w.device)


def _base_norm2(module, base) -> torch.Tensor:
    """||W_i||^2 per output row (fp32), recomputed only when the base weight object or storage changes."""
    key = _weight_key(base.weight)
    cached = module.__dict__.get("_prefopt_w2")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        weight_norm2 = rows_norm2(dequantize(base))
    module._prefopt_w2 = (key, weight_norm2)
    return weight_norm2


def _active_dora_adapter(module, args, kwargs):
    """The adapter to run fast, or None to hand the call to PEFT's forward. (Runs on every forward of every
    adapted layer: submodules are read from `_modules` directly, not through nn.Module.__getattr__.)"""
    if args or (kwargs and any(v is not None for v in kwargs.values())):
        return None
    if module.disable_adapters or module.merged:
        return None
    loras = module._modules["lora_A"]._modules
    active = [a for a in module.active_adapters if a in loras]
    if len(active) != 1:
        return None
    name = active[0]
    if not _is_dora_variant(module.lora_variant.get(name)) or module._modules["lora_B"]._modules[name].bias is not None:
        return None
    return name


def _dropout_active(module, dropout) -> bool:
    if isinstance(dropout, nn.Identity) or not module.training:
        return False
    if isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training):
        return False
    return True


def _shortcut_ok(base) -> bool:
    """Base layers whose weight may be used directly (DoraLinear, Shared4bit, W @ A^T): frozen weights,
    no hooks to miss."""
    w = base.weight
    if w.requires_grad or _compat.has_hooks(base):
        return False
    kind = type(w).__name__
    if kind == "Params4bit":
        qs = getattr(w, "quant_state", None)
        return qs is not None and not _compat.is_cpu_packed(qs)
    return type(base) is nn.Linear and kind in ("Parameter", "Tensor")


def _hookless(m) -> bool:
    return not _compat.has_hooks(m)


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and m._parameters.get("bias") is None and _hookless(m)


def _rescale(r: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """scale * (r + lora - bias) + bias, by plain autograd (for lora_B layers that are not plain Linear)."""
    y = r + lora
    if bias is None:
        return y * scale
    return torch.addcmul(bias.detach() * (1 - scale), y, scale)


class _Plan:
    """One adapter of one layer, resolved for the hot path: the modules its forward reads, and the cached
    inverse norm (times s) with the key it was computed under. Every forward of every adapted layer starts here, and on
    a small machine the Python objects a forward touches cost as much as its small kernels (after the layer's
    large matmuls they are out of cache), so the hot path reads these slots rather than walking PEFT's
    ModuleDicts and properties."""

    __slots__ = ("name", "active", "base", "lora_a", "lora_b", "mag", "dropout", "fusable", "key", "s_over_norm",
                 "nograd")

    def __init__(self, name, base, lora_a, lora_b, mag, dropout):
        self.name, self.base, self.lora_a, self.lora_b = name, base, lora_a, lora_b
        self.mag, self.dropout = mag, dropout
        self.active = self.key = self.s_over_norm = self.nograd = None
        # the one-node path reads these modules' weights itself: plain Linear low-rank factors without biases
        self.fusable = _plain_linear(lora_a) and _plain_linear(lora_b)


def _resolve(module, args, kwargs):
    """The plan for the active adapter (made on first use, or when its modules were replaced), or None to hand
    the call to PEFT's forward. Runs when the active adapter, disabled or merged state changed since the last
    forward (or the call has extra arguments)."""
    name = _active_dora_adapter(module, args, kwargs)
    if name is None:
        return None
    mods = module._modules
    base = mods["base_layer"]
    while "base_layer" in base._modules:  # as PEFT's get_base_layer, for nested tuner layers
        base = base._modules["base_layer"]
    parts = (base, mods["lora_A"]._modules[name], mods["lora_B"]._modules[name],
             mods["lora_magnitude_vector"]._modules[name], mods["lora_dropout"]._modules[name])
    plans = module.__dict__.setdefault("_prefopt_plans", {})
    p = plans.get(name)
    if p is None or (p.base, p.lora_a, p.lora_b, p.mag, p.dropout) != parts:
        p = plans[name] = _Plan(name, *parts)
    p.active = module._active_adapter
    module._prefopt_cur = p
    return p


def _sharded(w) -> bool:
    """A weight that is not all here: a DTensor shard (FSDP2), a ZeRO-3 placeholder (ds_id, 0 elements)."""
    return w is None or type(w).__name__ == "DTensor" or hasattr(w, "ds_id") or (w.numel() == 0)


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if torch.compiler.is_compiling():  # Dynamo traces PEFT's forward (docs/dora.md, "Freshness")
        return self._prefopt_peft_class.forward(self, x, *args, **kwargs)
    p = self.__dict__.get("_prefopt_cur")
    if args or kwargs or p is None or p.active is not self._active_adapter or self._disable_adapters or \
            self.merged_adapters:
        p = _resolve(self, args, kwargs)
        if p is None:
            STATS["fallback"] += 1
            return self._prefopt_peft_class.forward(self, x, *args, **kwargs)
    base, lora_a, lora_b, dropout = p.base, p.lora_a, p.lora_b, p.dropout
    base_w, a_w, b_w = base._parameters["weight"], lora_a._parameters["weight"], lora_b._parameters["weight"]
    if _sharded(base_w) or _sharded(a_w) or _sharded(b_w):
        # FSDP2 / DeepSpeed ZeRO-3 shard weights and gather them in the layers' own forward hooks, which the fast
        # path would bypass (it reads base.weight itself): PEFT's forward calls the base layer, so hooks run
        STATS["fallback"] += 1
        return self._prefopt_peft_class.forward(self, x, *args, **kwargs)
    STATS["fast"] += 1
    magnitude = p.mag._parameters["weight"]
    scaling = self.scaling[p.name]
    drop = self.training and _dropout_active(self, dropout)
    full = drop and self._prefopt_dora_dropout == "full"
    # The norm is reused only where provably fresh (docs/dora.md, "Freshness"): once per optimizer step under
    # gradient accumulation, once for DPO's frozen "ref" copy, not again in gradient checkpointing's
    # recomputation, once in eval.
    a_stamp, b_stamp = a_w.__dict__.get(_STAMP), b_w.__dict__.get(_STAMP)
    key = (a_w._version, b_w._version, base_w._version, a_stamp, b_stamp, id(a_w), id(b_w), id(base_w),
           a_w.data_ptr(), b_w.data_ptr(), base_w.data_ptr(), scaling)
    fresh = p.key == key and (
        ((a_stamp is not None or not a_w.requires_grad) and (b_stamp is not None or not b_w.requires_grad))
        or (p.nograd and not torch.is_grad_enabled()) or _compat.in_backward())
    if not fresh:
        p.nograd = not torch.is_grad_enabled()
    shortcut_ok = _shortcut_ok(base)
    dev = x.device.type
    ac = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    if not full and shortcut_ok and p.fusable and _hookless(lora_a) and _hookless(lora_b) and _hookless(p.mag):
        # the common case, one autograd node for the whole layer
        STATS["one_node"] += 1
        x_drop = dropout(self._cast_input_dtype(rows, a_w.dtype)) if drop else None
        weight_norm2 = None
        if not fresh:
            weight_norm2 = _base_norm2(self, base)
            STATS["norms"] += 1
        out = DoraLinear.apply(rows, x_drop, a_w, b_w, magnitude, base, p, None if fresh else key, weight_norm2,
                               scaling, ac)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return _general_forward(self, p, x, rows, drop, full, shortcut_ok, key, fresh, scaling, ac)


def _general_forward(self, p, x, rows, drop, full, shortcut_ok, key, fresh, scaling, ac):
    """Every other case: `full` dropout, hooked base layers, 8-bit bases, low-rank factors that are not plain
    Linear layers. The base call is shared or left to the layer; autograd does the rest. Under autocast (`ac`) the
    base calls are the layer's own (autocast picks their dtypes), as PEFT's are."""
    base, lora_a, lora_b, dropout = p.base, p.lora_a, p.lora_b, p.dropout
    base_w, a_w, b_w = base.weight, lora_a.weight, lora_b.weight
    magnitude = p.mag.weight
    quantized = type(base_w).__name__
    # PEFT's bnb layers leave dtypes to autocast when it is on; its plain Linear always casts
    convert = not (quantized in ("Params4bit", "Int8Params") and ac is not None)
    x_cast = self._cast_input_dtype(x, a_w.dtype) if convert else x
    x_drop = dropout(x_cast) if drop else x_cast
    in_features = x.shape[-1]
    n = rows.shape[0]
    xs = [rows, x_drop.reshape(-1, in_features).to(rows.dtype)] if full else [rows]
    a_rows = None if fresh else a_w.detach().to(rows.dtype)
    weight_a_t = a_rows_out = None  # W A^T (out x r), or the A rows' outputs of a shared base call
    if quantized == "Params4bit" and shortcut_ok and ac is None and (a_rows is not None or full):
        # 4-bit: one dequantization serves every product, with no copy of x and no gradient work for A
        outs = Shared4bit.apply(a_rows, base, *xs)
        base_outs, weight_a_t = (outs[:-1], outs[-1]) if a_rows is not None else (outs, None)
    elif a_rows is not None and (not shortcut_ok or ac is not None):
        # behind hooks or autocast the layer makes its own call: the A rows ride along in its batch
        out = base(torch.cat([*xs, a_rows]))
        base_outs = Rows.apply(out, n, full)[: len(xs)]
        a_rows_out = out[len(xs) * n :]
    else:
        base_outs = [base(x_) for x_ in xs]
    result, base_dropped_out = base_outs[0], (base_outs[1] if full else None)
    bias = base.bias
    if not fresh:
        with torch.no_grad():
            # W A^T as out x r: W @ A^T, not A @ W^T (BLAS is several times slower with only r output rows)
            if a_rows_out is not None:
                weight_a_t = a_rows_out.t() if bias is None else (a_rows_out - bias.to(a_rows_out.dtype)).t()
            elif weight_a_t is None and quantized == "Int8Params":  # LLM.int8 would quantize the A rows
                weight_a_t = dequantize(base).float() @ a_rows.float().t()
            elif weight_a_t is None:
                weight_a_t = base_w @ a_rows.to(base_w.dtype).t()
            p.key, p.s_over_norm = key, inv_norm_s(_base_norm2(self, base), weight_a_t, a_w, b_w, scaling)
            STATS["norms"] += 1

    torch_result_dtype = result.dtype
    mag_norm_scale = (magnitude * (p.s_over_norm * (1 / scaling)).to(x_cast.dtype)).view(1, -1)
    lora_a_out = lora_a(x_drop.reshape(-1, in_features))
    # PEFT's result + (mag_norm_scale - 1) * base_result + mag_norm_scale * s * lora_result is
    # mag_norm_scale * (W x + s B A x - ... ) + bias [full: base(x) - base(x_drop) + mag_norm_scale * (W x_drop +
    # s B A x_drop) + bias]. With mag_norm_scale folded into B (out x r) and the bias term into the low-rank matmul,
    # it is one fused pass over the output, as LoRA's own addition.
    base_out = base_dropped_out if full else result
    if _plain_linear(lora_b):  # s and mag_norm_scale folded into B (out x r): no full-size pass for either
        b_scaled = (b_w * (mag_norm_scale.view(-1, 1) * scaling)).to(lora_a_out.dtype)
        bias_term = None if bias is None else (bias.detach() * (1 - mag_norm_scale.view(-1))).to(lora_a_out.dtype)
        combined = torch.addcmul(torch.nn.functional.linear(lora_a_out, b_scaled, bias_term), base_out, mag_norm_scale)
    else:
        combined = _rescale(base_out, lora_b(lora_a_out * scaling), mag_norm_scale, bias)
    result = (result - base_dropped_out) + combined if full else combined
    if convert:
        result = result.to(torch_result_dtype)
    return result.reshape(*x.shape[:-1], result.shape[-1])
