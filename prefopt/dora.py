"""An exact low-rank DoRA forward that never materialises W + s·B·A.

PEFT's DoRA layer, on every forward of every adapted layer, dequantizes the whole base weight,
builds B·A as a full out x in matrix, adds them and takes row norms; with adapter dropout on it also
runs the base matmul a second time on the dropped-out input. The norm never needs the full matrix:
per output row i, with W frozen,

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T

- ||W_i||^2 is a constant, computed once per layer from the dequantized weight (and again only if the
  base weight object changes);
- W A^T (out x r) is what the base layer computes for r extra input rows: on a 4-bit base it comes from the
  same dequantization as the layer's own matmul (no second dequantization, no copy of the input, no gradient
  work for it); behind forward hooks the r rows of A (detached) ride along in the batch of the base call and
  are split off again; a plain frozen Linear multiplies A directly; an 8-bit base dequantizes for these r
  rows (LLM.int8 would quantize them);
- A A^T is r x r; the rest is O(out r^2);
- the norm is cached until a weight it depends on changes (version counters), so it is computed once per
  optimizer step, not once per micro-batch, recomputation or frozen-reference forward.

The output is PEFT's result + (scale - 1) base_result + scale s B A x with scale = m / ||W + s BA||, computed
as one fused pass, scale * base(x) + x A^T (s scale B)^T (+ bias (1 - scale)), with scale folded into the
r-wide factor: the same number of full-size passes as LoRA's own addition, plus the magnitude gradient.

In the common case (no dropout or `lowrank` dropout; a frozen plain-Linear or 4-bit base and plain-Linear
factors, none behind hooks; no autocast) the whole layer, base matmul included, is one autograd node with a
written-out backward (`_DoraLinear`). At small widths DoRA's cost over LoRA is not arithmetic but fixed
per-layer work: small kernels, autograd nodes and the Python around them (which, after a layer's large
matmuls, runs out of cache). So the hot path resolves each adapter's modules once (`_Plan`), and the norm
takes four small kernels after W A^T. Everything else takes the general path, with autograd.

The norm is detached, as in the DoRA paper and PEFT, so gradients are PEFT's. Nothing about the adapter
changes: the modules keep their PEFT parameters (lora_A, lora_B, lora_magnitude_vector), so saved
adapters are plain PEFT adapters, and anything this path does not handle (several active adapters, mixed
batches, merged or disabled adapters, fan_in_fan_out, lora_bias, non-Linear layers) runs PEFT's own forward.

Adapter dropout has two published semantics (`dropout=`):
- "lowrank": dropout on the low-rank branch only, out = scale * (base(x) + s B A dropout(x)), as torchtune's
  DoRALinear; no second base matmul.
- "full": the DoRA paper's / PEFT's out = base(x) + (scale - 1) base(dropout(x)) + scale s B A dropout(x),
  bit-for-bit PEFT's semantics; on a 4-bit base the second product shares the one dequantization.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

DROPOUT_MODES = ("lowrank", "full")
_FAST = "_prefopt_fast_dora"  # class attribute marking a swapped class
_CLASSES: dict[type, type] = {}
# per process: fast forwards taken, PEFT fallbacks, weight norms computed (not served from the cache)
STATS = {"fast": 0, "fallback": 0, "norms": 0}


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
    from .models import harden_4bit_layers

    harden_4bit_layers(model)
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
    """Forget every cached weight norm. Only needed after changing adapter weights behind autograd's back
    (`param.data.copy_(...)` and the like do not move the version counters the cache is keyed on)."""
    for m in model.modules():
        for plan in m.__dict__.get("_prefopt_plans", {}).values():
            plan.key = None


def fast_dora_layers(model: nn.Module) -> int:
    """How many layers of `model` take the fast path."""
    return sum(1 for m in model.modules() if getattr(type(m), _FAST, False))


# ---------------------------------------------------------------------------------------------- forward


def _weight_key(w: torch.Tensor) -> tuple:
    return (id(w), w.data_ptr(), w._version, w.device)


def _dequantized(base) -> torch.Tensor:
    """The base weight as a float tensor, without touching the module (PEFT's helper re-assigns an 8-bit
    weight on CPU, which breaks the layer's next forward)."""
    w = base.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if kind == "Int8Params":
        import bitsandbytes as bnb

        scb = base.state.SCB if getattr(base, "state", None) is not None and base.state.SCB is not None else w.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(base)


def _base_norm2(module, base) -> torch.Tensor:
    """||W_i||^2 per output row (fp32), recomputed only when the base weight object or storage changes."""
    key = _weight_key(base.weight)
    cached = module.__dict__.get("_prefopt_w2")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        w = _dequantized(base)
        w2 = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
        step = max(1, (1 << 24) // max(1, w.shape[1]))  # bound the fp32 temporary to ~64 MB
        for i in range(0, w.shape[0], step):
            w2[i : i + step] = w[i : i + step].float().pow(2).sum(1)
    module._prefopt_w2 = (key, w2)
    return w2


def _inv_norm_s(w2, wat, lora_a, lora_b, scaling) -> torch.Tensor:
    """s / ||W + s B A|| per row (fp32) from ||W||^2, W A^T (out x r) and the low-rank factors: five small
    kernels after W A^T (per layer and step, each kernel's fixed cost outweighs its arithmetic)."""
    f32 = torch.float32
    wat, a, b = (t if t.dtype == f32 else t.float() for t in (wat, lora_a, lora_b))  # (called under no_grad)
    # ||W_i||^2 + 2s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T  =  ||W_i||^2 + 2s B_i . (W A^T + (s/2) B A A^T)_i,
    # divided by s^2 (so that its rsqrt is s / norm)
    t = torch.addmm(wat, b, a @ a.t(), alpha=scaling / 2)
    n2 = torch.baddbmm(w2.view(-1, 1, 1), b.unsqueeze(1), t.unsqueeze(2), beta=1 / scaling**2, alpha=2 / scaling)
    return n2.view(-1).clamp_min_(0).rsqrt_()


class _Rows(torch.autograd.Function):
    """Split a tensor's leading rows into [0, n) and [n, 2n) (or an empty second part); the remaining rows
    (the ride-along A rows) get a zero gradient. Same as slicing, with one pass fewer in backward."""

    @staticmethod
    def forward(ctx, t, n, two):
        ctx.shape, ctx.n = t.shape, n
        ctx.set_materialize_grads(False)
        return t.narrow(0, 0, n), t.narrow(0, n, n if two else 0)

    @staticmethod
    def backward(ctx, g1, g2):
        n, (rows, cols) = ctx.n, ctx.shape
        ref = g1 if g1 is not None else g2
        parts = [g1 if g1 is not None else ref.new_zeros(n, cols)]
        if g2 is not None:
            parts.append(g2)
        used = sum(p.shape[0] for p in parts)
        parts.append(ref.new_zeros(rows - used, cols))
        return torch.cat(parts), None, None


def _plan(module, args, kwargs):
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


class _Shared4bit(torch.autograd.Function):
    """One dequantization of a frozen 4-bit weight serves base(x), base(xd) for `full` dropout and, when the
    norm is due, W A^T (a_rows=None skips it), as the base layer's own matmul would: out = x W^T + bias in the layer's compute dtype. Backward: the input gradients only
    (W is frozen), from a fresh dequantization as bitsandbytes does; no gradient work for the A rows."""

    @staticmethod
    def forward(ctx, a_rows, base, *xs):
        import bitsandbytes as bnb

        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)
        if not base.compute_type_is_set:
            base.set_compute_type(xs[0])
            base.compute_type_is_set = True
        dtype = base.compute_dtype or xs[0].dtype
        w = base.weight
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        outs = [torch.nn.functional.linear(x.to(dtype), deq, bias).to(x.dtype) for x in xs]
        ctx.base, ctx.x_dtypes = base, [x.dtype for x in xs]
        if a_rows is None:
            return tuple(outs)
        wat = deq @ a_rows.to(dtype).t()  # out x r: the cheap BLAS orientation
        ctx.mark_non_differentiable(wat)
        return (*outs, wat)

    @staticmethod
    def backward(ctx, *grads):
        import bitsandbytes as bnb

        base = ctx.base
        w = base.weight
        out = [None, None]
        deq = None
        for g, dt in zip(grads, ctx.x_dtypes):  # (a trailing W A^T grad, if any, is ignored by zip)
            if g is None:
                out.append(None)
                continue
            dtype = base.compute_dtype or g.dtype
            if deq is None:
                deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)
            out.append((g.to(dtype) @ deq).to(dt))
        return tuple(out)


class _DoraLinear(torch.autograd.Function):
    """The whole adapted layer, base matmul included, as one autograd node (no dropout, or `lowrank` dropout):

        out = base(x) s' / s + xd A^T (s' B)^T + bias (1 - s' / s),    s' = s m / ||W + s B A|| (norm detached)

    (s' = s * scale: PEFT's scale = m / norm, times the LoRA scaling), for a frozen plain-Linear or 4-bit base
    (one dequantization serves base(x) and, when the norm is due, W A^T) and plain-Linear lora_A / lora_B.
    `xd` is the (dropped-out) low-rank input, or None when it is `x` itself. With `key` set the norm is
    computed here and cached on `plan` under that key; otherwise the plan's cached norm is used. The backward
    is written out: the gradients autograd gives for the same expression with the norm constant, in one node
    instead of a dozen, and no pass over the output the expression does not need. (Per layer and step such
    fixed costs, not arithmetic, are what DoRA adds to LoRA at small widths.)"""

    @staticmethod
    def forward(ctx, x, xd, a, b, m, base, plan, key, s):
        w = base.weight
        four_bit = type(w).__name__ == "Params4bit"
        if four_bit:
            import bitsandbytes as bnb

            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)
            if not base.compute_type_is_set:
                base.set_compute_type(x)
                base.compute_type_is_set = True
            dtype = base.compute_dtype or x.dtype
            w = bnb.functional.dequantize_4bit(w.data, w.quant_state)
            if w.dtype != dtype:
                w = w.to(dtype)
        else:
            dtype = x.dtype
        bias = base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        r = torch.nn.functional.linear(x if x.dtype == dtype else x.to(dtype), w, bias)
        if r.dtype != x.dtype:
            r = r.to(x.dtype)
        ct = a.dtype  # PEFT runs the low-rank branch in the adapter's dtype
        xl = x if xd is None else xd
        if xl.dtype != ct:
            xl = xl.to(ct)
        if key is not None:  # W A^T as out x r: W @ A^T (BLAS is several times slower with only r output rows)
            wat = w @ (a if a.dtype == w.dtype else a.to(w.dtype)).t()
            plan.key, plan.inv_s = key, _inv_norm_s(plan.w2, wat, a, b, s)
            STATS["norms"] += 1
        inv_s = plan.inv_s
        ss = m * inv_s  # s * scale
        h = torch.nn.functional.linear(xl, a)
        w_b = b * ss.unsqueeze(1)
        if w_b.dtype != ct:
            w_b = w_b.to(ct)
        # PEFT's base bias stays out of the rescaling: + bias (1 - scale), folded into the low-rank matmul
        lin = torch.nn.functional.linear(h, w_b, None if bias is None else (bias - bias * (ss / s)).to(ct))
        ssl = ss if ss.dtype == lin.dtype else ss.to(lin.dtype)
        if lin.dtype == torch.promote_types(lin.dtype, r.dtype):  # into lin's own buffer: no new n x out tensor
            out = lin.addcmul_(r, ssl, value=1 / s)
        else:
            out = torch.addcmul(lin, r, ssl, value=1 / s)
        if out.dtype != r.dtype:
            out = out.to(r.dtype)
        ctx.base, ctx.four_bit, ctx.dtype, ctx.s, ctx.same = base, four_bit, dtype, s, xd is None
        ctx.xd_dtype, ctx.m_dtype = (None if xd is None else xd.dtype), m.dtype
        ctx.save_for_backward(xl, h, r, a, b, w_b, ss, inv_s)
        return out

    @staticmethod
    def backward(ctx, g):
        xl, h, r, a, b, w_b, ss, inv_s = ctx.saved_tensors
        need_x, need_xd, need_a, need_b, need_m = ctx.needs_input_grad[:5]
        base, s = ctx.base, ctx.s
        gc = g if g.dtype == h.dtype else g.to(h.dtype)
        grad_x = grad_xd = grad_a = grad_b = grad_m = None
        if need_b or need_m:
            grad_wb = gc.t() @ h  # out x r
            if need_b:
                grad_b = grad_wb * ss.unsqueeze(1)
                if grad_b.dtype != b.dtype:
                    grad_b = grad_b.to(b.dtype)
            if need_m:
                # dL/dm = (s / norm) (sum_n g r / s  +  grad_wb . B  [- bias sum_n g / s]), per row, in fp32
                f32 = inv_s.dtype
                gs = torch.linalg.vecdot(g, r, dim=0) if g.dtype == f32 == r.dtype else \
                    torch.linalg.vecdot(g.to(f32), r.to(f32), dim=0)
                if base.bias is not None:
                    gs = gs - base.bias.to(f32) * g.to(f32).sum(0)
                gm = torch.baddbmm(gs.view(-1, 1, 1), grad_wb.to(f32).unsqueeze(1), b.to(f32).unsqueeze(2),
                                   beta=1 / s)
                grad_m = gm.view(-1).mul_(inv_s)
        need_h = need_a or need_xd or (need_x and ctx.same)
        grad_h = gc @ w_b if need_h else None  # n x r
        if need_a:
            grad_a = grad_h.t() @ xl
            if grad_a.dtype != a.dtype:
                grad_a = grad_a.to(a.dtype)
        if need_x:
            w = base.weight
            if ctx.four_bit:
                import bitsandbytes as bnb

                w = bnb.functional.dequantize_4bit(w.data, w.quant_state)
                if w.dtype != ctx.dtype:
                    w = w.to(ctx.dtype)
            # (g * scale) @ W: the scale goes on whichever is smaller, g (n x out) or W (out x in; on a 4-bit
            # base the fresh dequantization, in place)
            scale = ss * (1 / s)
            if g.shape[0] > w.shape[1]:
                sc = scale.to(ctx.dtype).unsqueeze(1)
                w = w.mul_(sc) if ctx.four_bit else w * sc
                grad_x = (g if g.dtype == ctx.dtype else g.to(ctx.dtype)) @ w
            else:
                gb = g * (scale if scale.dtype == g.dtype else scale.to(g.dtype))
                grad_x = (gb if gb.dtype == ctx.dtype else gb.to(ctx.dtype)) @ w
            if ctx.same:
                if grad_x.dtype == grad_h.dtype and a.dtype == grad_h.dtype:
                    grad_x = grad_x.addmm_(grad_h, a)
                else:
                    grad_x = grad_x + (grad_h @ a).to(grad_x.dtype)
            if grad_x.dtype != g.dtype:
                grad_x = grad_x.to(g.dtype)
        if need_xd:
            grad_xd = grad_h @ a
            if grad_xd.dtype != ctx.xd_dtype:
                grad_xd = grad_xd.to(ctx.xd_dtype)
        if grad_m is not None and grad_m.dtype != ctx.m_dtype:
            grad_m = grad_m.to(ctx.m_dtype)
        return grad_x, grad_xd, grad_a, grad_b, grad_m, None, None, None, None


def _shortcut_ok(base) -> bool:
    """Base layers whose weight may be used directly (_DoraLinear, _Shared4bit, W @ A^T): frozen weights,
    no hooks to miss, no autocast."""
    w = base.weight
    if w.requires_grad or torch.is_autocast_enabled() or base._forward_hooks or base._forward_pre_hooks:
        return False
    if base.__dict__.get("_hf_hook") is not None:  # accelerate's hook (a plain attribute)
        return False
    kind = type(w).__name__
    if kind == "Params4bit":
        qs = getattr(w, "quant_state", None)
        return qs is not None and not getattr(qs, "packing_format_for_cpu", False)
    return type(base) is nn.Linear and kind in ("Parameter", "Tensor")


def _hookless(m) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m.__dict__.get("_hf_hook") is not None)


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

    __slots__ = ("name", "active", "base", "lora_a", "lora_b", "mag", "dropout", "fusable", "key", "inv_s", "w2")

    def __init__(self, name, base, lora_a, lora_b, mag, dropout):
        self.name, self.base, self.lora_a, self.lora_b, self.mag, self.dropout = name, base, lora_a, lora_b, mag, dropout
        self.active = self.key = self.inv_s = self.w2 = None
        # the one-node path reads these modules' weights itself: plain Linear low-rank factors without biases
        self.fusable = _plain_linear(lora_a) and _plain_linear(lora_b)


def _resolve(module, args, kwargs):
    """The plan for the active adapter (made on first use, or when its modules were replaced), or None to hand
    the call to PEFT's forward. Runs when the active adapter, disabled or merged state changed since the last
    forward (or the call has extra arguments)."""
    name = _plan(module, args, kwargs)
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


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    p = self.__dict__.get("_prefopt_cur")
    if args or kwargs or p is None or p.active is not self._active_adapter or self._disable_adapters or \
            self.merged_adapters:
        p = _resolve(self, args, kwargs)
        if p is None:
            STATS["fallback"] += 1
            return self._prefopt_peft_class.forward(self, x, *args, **kwargs)
    STATS["fast"] += 1
    base, lora_a, lora_b, dropout = p.base, p.lora_a, p.lora_b, p.dropout
    base_w, a_w, b_w = base._parameters["weight"], lora_a._parameters["weight"], lora_b._parameters["weight"]
    magnitude = p.mag._parameters["weight"]
    scaling = self.scaling[p.name]
    drop = self.training and _dropout_active(self, dropout)
    full = drop and self._prefopt_dora_dropout == "full"
    # The norm is cached until a weight it depends on changes (their version counters move with every in-place
    # update, e.g. an optimizer step): so it is computed once per optimizer step under gradient accumulation,
    # once for DPO's frozen "ref" copy, not again in gradient checkpointing's recomputation, once in eval.
    key = (a_w._version, b_w._version, base_w._version, id(a_w), id(b_w), id(base_w), a_w.data_ptr(),
           b_w.data_ptr(), base_w.data_ptr(), scaling)
    fresh = p.key == key
    shortcut_ok = _shortcut_ok(base)
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    if not full and shortcut_ok and p.fusable and _hookless(lora_a) and _hookless(lora_b) and _hookless(p.mag):
        # the common case, one autograd node for the whole layer
        xd = dropout(self._cast_input_dtype(rows, a_w.dtype)) if drop else None
        if not fresh:
            p.w2 = _base_norm2(self, base)
        out = _DoraLinear.apply(rows, xd, a_w, b_w, magnitude, base, p, None if fresh else key, scaling)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return _general_forward(self, p, x, rows, drop, full, shortcut_ok, key, fresh, scaling)


def _general_forward(self, p, x, rows, drop, full, shortcut_ok, key, fresh, scaling):
    """Every other case: `full` dropout, hooked or autocast base layers, 8-bit bases, low-rank factors that are
    not plain Linear layers. The base call is shared or left to the layer; autograd does the rest."""
    base, lora_a, lora_b, dropout = p.base, p.lora_a, p.lora_b, p.dropout
    base_w, a_w, b_w = base.weight, lora_a.weight, lora_b.weight
    magnitude = p.mag.weight
    quantized = type(base_w).__name__
    # PEFT's bnb layers leave dtypes to autocast when it is on; its plain Linear always casts
    convert = not (quantized in ("Params4bit", "Int8Params") and torch.is_autocast_enabled())
    xl = self._cast_input_dtype(x, a_w.dtype) if convert else x
    xd = dropout(xl) if drop else xl
    in_features = x.shape[-1]
    n = rows.shape[0]
    xs = [rows, xd.reshape(-1, in_features).to(rows.dtype)] if full else [rows]
    a_rows = None if fresh else a_w.detach().to(rows.dtype)
    wat = tail = None  # W A^T (out x r), or the A rows' outputs of a shared base call
    if quantized == "Params4bit" and shortcut_ok and (a_rows is not None or full):
        # 4-bit: one dequantization serves every product, with no copy of x and no gradient work for A
        outs = _Shared4bit.apply(a_rows, base, *xs)
        ys, wat = (outs[:-1], outs[-1]) if a_rows is not None else (outs, None)
    elif a_rows is not None and not shortcut_ok:
        # behind hooks or autocast the layer makes its own call: the A rows ride along in its batch
        out = base(torch.cat([*xs, a_rows]))
        ys = _Rows.apply(out, n, full)[: len(xs)]
        tail = out[len(xs) * n :]
    else:
        ys = [base(x_) for x_ in xs]
    result, base_d = ys[0], (ys[1] if full else None)
    bias = base.bias
    if not fresh:
        with torch.no_grad():
            # W A^T as out x r: W @ A^T, not A @ W^T (BLAS is several times slower with only r output rows)
            if tail is not None:
                wat = tail.t() if bias is None else (tail - bias.to(tail.dtype)).t()
            elif wat is None and quantized == "Int8Params":  # LLM.int8 would quantize the A rows
                wat = _dequantized(base).float() @ a_rows.float().t()
            elif wat is None:
                wat = base_w @ a_rows.to(base_w.dtype).t()
            p.key, p.inv_s = key, _inv_norm_s(_base_norm2(self, base), wat, a_w, b_w, scaling)
            STATS["norms"] += 1

    torch_result_dtype = result.dtype
    scale = (magnitude * (p.inv_s * (1 / scaling)).to(xl.dtype)).view(1, -1)
    h = lora_a(xd.reshape(-1, in_features))
    # PEFT's result + (scale - 1) * base_result + scale * s * lora_result is scale * (W x + s B A x - ... ) + bias
    # [full: base(x) - base(xd) + scale * (W xd + s B A xd) + bias]. With scale folded into B (out x r) and the
    # bias term into the low-rank matmul, it is one fused pass over the output, as LoRA's own addition.
    r = base_d if full else result
    if _plain_linear(lora_b):  # s and scale folded into B (out x r): no full-size pass for either
        w_b = (b_w * (scale.view(-1, 1) * scaling)).to(h.dtype)
        v_b = None if bias is None else (bias.detach() * (1 - scale.view(-1))).to(h.dtype)
        combined = torch.addcmul(torch.nn.functional.linear(h, w_b, v_b), r, scale)
    else:
        combined = _rescale(r, lora_b(h * scaling), scale, bias)
    result = (result - base_d) + combined if full else combined
    if convert:
        result = result.to(torch_result_dtype)
    return result.reshape(*x.shape[:-1], result.shape[-1])
