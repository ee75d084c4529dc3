"""The autograd functions and norm arithmetic that prefopt's fast DoRA forward (prefopt.dora) is built from.

prefopt.dora decides, per call, which of these a layer's forward takes; this module only computes. The base
weights here are frozen: no function computes a gradient for them.
"""

from __future__ import annotations

import torch

from ..quant import compute_dtype_4bit, dequantize_4bit

# Under autocast the one-node path sums u and the output in this dtype and rounds once at the end (fp32: the gradients
# stay as close to fp32 as PEFT's own; docs/dora.md). `scripts/bench_dora.py --autocast-sum bf16` times the layer with
# the sum kept in bf16 instead: the controlled experiment for what the fp32 sum costs (docs/benchmarks.md).
AUTOCAST_SUM_DTYPE = torch.float32


def rows_norm2(w: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 per output row of a (dequantized) weight, in fp32, a slice of rows at a time."""
    weight_norm2 = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, (1 << 24) // max(1, w.shape[1]))  # bound the fp32 temporary to ~64 MB
    for i in range(0, w.shape[0], step):
        weight_norm2[i : i + step] = w[i : i + step].float().pow(2).sum(1)
    return weight_norm2


def inv_norm_s(weight_norm2, weight_a_t, lora_a, lora_b, scaling) -> torch.Tensor:
    """s / ||W + s B A|| per row (fp32) from ||W||^2, W A^T (out x r) and the low-rank factors: five small
    kernels after W A^T (per layer and step, each kernel's fixed cost outweighs its arithmetic).

    A row whose norm is 0 (a base row of zeros, with B's row still 0, as at init) gets 0, not inf: its DoRA scale
    m / ||W + s B A|| is held at 0, where PEFT's 0 / 0 gives NaN (docs/dora.md, "Base rows of norm 0"); the row's
    output is the base's (W_i x = 0) and its gradients are 0. The same kernel that did the clamp to 0 does it (no
    extra kernel; every other row bit for bit as before): rounding below 0 gives 0 too, and so would a NaN, which
    NaN weights carry into the output through the matmuls anyway."""
    f32 = torch.float32
    # (called under no_grad)
    weight_a_t, a, b = (t if t.dtype == f32 else t.float() for t in (weight_a_t, lora_a, lora_b))
    # ||W_i||^2 + 2s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T  =  ||W_i||^2 + 2s B_i . (W A^T + (s/2) B A A^T)_i,
    # divided by s^2 (so that its rsqrt is s / norm)
    t = torch.addmm(weight_a_t, b, a @ a.t(), alpha=scaling / 2)
    norm2_over_s2 = torch.baddbmm(weight_norm2.view(-1, 1, 1), b.unsqueeze(1), t.unsqueeze(2), beta=1 / scaling**2,
                                  alpha=2 / scaling)
    return norm2_over_s2.view(-1).rsqrt_().nan_to_num_(nan=0.0, posinf=0.0)


class Rows(torch.autograd.Function):
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


class Shared4bit(torch.autograd.Function):
    """One dequantization of a frozen 4-bit weight serves base(x), base(x_drop) for `full` dropout and, when the
    norm is due, W A^T (a_rows=None skips it), as the base layer's own matmul would: out = x W^T + bias in the
    layer's compute dtype. Backward: the input gradients only
    (W is frozen), from a fresh dequantization as bitsandbytes does; no gradient work for the A rows."""

    @staticmethod
    def forward(ctx, a_rows, base, *xs):
        dtype = compute_dtype_4bit(base, xs[0])
        deq = dequantize_4bit(base, dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        outs = [torch.nn.functional.linear(x.to(dtype), deq, bias).to(x.dtype) for x in xs]
        ctx.base, ctx.x_dtypes = base, [x.dtype for x in xs]
        if a_rows is None:
            return tuple(outs)
        weight_a_t = deq @ a_rows.to(dtype).t()  # out x r: the cheap BLAS orientation
        ctx.mark_non_differentiable(weight_a_t)
        return (*outs, weight_a_t)

    @staticmethod
    def backward(ctx, *grads):
        base = ctx.base
        out = [None, None]
        deq = None
        for g, dt in zip(grads, ctx.x_dtypes):  # (a trailing W A^T grad, if any, is ignored by zip)
            if g is None:
                out.append(None)
                continue
            dtype = base.compute_dtype or g.dtype
            if deq is None:
                deq = dequantize_4bit(base, dtype)
            out.append((g.to(dtype) @ deq).to(dt))
        return tuple(out)


class DoraLinear(torch.autograd.Function):
    """The whole adapted layer, base matmul included, as one autograd node (no dropout, or `lowrank` dropout):

        out = s' (base(x) / s + x_drop A^T B^T) + bias (1 - s' / s),    s' = s m / ||W + s B A|| (norm detached)

    (s' = s * scale: PEFT's scale = m / norm, times the LoRA scaling), for a frozen plain-Linear or 4-bit base
    (one dequantization serves base(x) and, when the norm is due, W A^T) and plain-Linear lora_A / lora_B.
    `x_drop` is the (dropped-out) low-rank input, or None when it is `x` itself. With `key` set the norm is
    computed here from `weight_norm2` (||W_i||^2) and cached on `plan` under that key; otherwise the plan's cached norm
    is used.

    `ac` is the autocast dtype when the call runs under autocast (mixed precision), else None. Then the matmuls
    run in `ac`, as autocast would run them (the base's and the low-rank branch's), the norm in fp32 from the
    unrounded weights, and the gradients come back in the inputs' and parameters' own dtypes; the body runs with
    autocast off, so that these explicit dtypes are the ones used, in the forward and in the backward.

    The unscaled sum u = base(x) / s + x_drop A^T B^T (`unscaled`) is accumulated into the base output's own
    buffer and kept for the backward, where it gives the magnitude gradient in one pass:
    dL/dm = (s / norm) sum_n g (u - bias / s).
    The backward is written out: the gradients autograd gives for the same expression with the norm constant,
    in one node instead of a dozen, and no pass over the output the expression does not need. (Per layer and
    step such fixed costs, not arithmetic, are what DoRA adds to LoRA at small widths.)"""

    @staticmethod
    def forward(ctx, x, x_drop, a, b, m, base, plan, key, weight_norm2, s, ac):
        if ac is None:
            return DoraLinear._forward(ctx, x, x_drop, a, b, m, base, plan, key, weight_norm2, s, None)
        with torch.autocast(x.device.type, enabled=False):
            return DoraLinear._forward(ctx, x, x_drop, a, b, m, base, plan, key, weight_norm2, s, ac)

    @staticmethod
    def _forward(ctx, x, x_drop, a, b, m, base, plan, key, weight_norm2, s, ac):
        w = w0 = base.weight
        four_bit = type(w).__name__ == "Params4bit"
        if four_bit:
            dtype = ac or compute_dtype_4bit(base, x)
            w = w0 = dequantize_4bit(base, dtype)
        else:
            dtype = ac or x.dtype
            if w.dtype != dtype:
                w = w.to(dtype)
        bias = base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        x_c = x if x.dtype == dtype else x.to(dtype)
        base_out = torch.nn.functional.linear(x_c, w, bias)
        # the base's output dtype: bitsandbytes casts back to the input's, nn.Linear under autocast gives ac
        out_dtype = x.dtype if (ac is None or four_bit) else ac
        lr_dtype = ac or a.dtype  # PEFT runs the low-rank branch in the adapter's dtype (autocast: in ac)
        if ac is None and base_out.dtype != x.dtype:
            base_out = base_out.to(x.dtype)
        x_lr = x if x_drop is None else x_drop
        if x_lr.dtype != lr_dtype:  # (the base's cast of x where it is the same: one conversion, one saved tensor)
            x_lr = x_c if x_drop is None and lr_dtype == dtype else x_lr.to(lr_dtype)
        if key is not None:  # W A^T as out x r: W @ A^T (BLAS is several times slower with only r output rows)
            weight_a_t = w0 @ (a if a.dtype == w0.dtype else a.to(w0.dtype)).t()
            plan.key, plan.s_over_norm = key, inv_norm_s(weight_norm2, weight_a_t, a, b, s)
        s_over_norm = plan.s_over_norm
        scale_s = m * s_over_norm  # s' = s m / ||W + s B A||: PEFT's mag_norm_scale times the LoRA scaling s
        a_lr = a if a.dtype == lr_dtype else a.to(lr_dtype)
        lora_a_out = torch.nn.functional.linear(x_lr, a_lr)
        # under autocast u and the output are summed in fp32, rounded once at the end, as PEFT's fp32 combination is
        # (u kept in bf16 put the magnitude and q/k gradients further from fp32 than PEFT's: docs/dora.md)
        sum_dtype = AUTOCAST_SUM_DTYPE if ac is not None else torch.promote_types(base_out.dtype, lr_dtype)
        b_t = (b if b.dtype == sum_dtype else b.to(sum_dtype)).t()
        lora_a_sum = lora_a_out if lora_a_out.dtype == sum_dtype else lora_a_out.to(sum_dtype)
        if base_out.dtype == sum_dtype:  # base_out / s + (x A^T) B^T into base_out's own (fresh) buffer: no new tensor
            unscaled = base_out.addmm_(lora_a_sum, b_t, beta=1 / s)
        else:
            unscaled = torch.addmm(base_out.to(sum_dtype), lora_a_sum, b_t, beta=1 / s)
        scale_s_sum = scale_s if scale_s.dtype == sum_dtype else scale_s.to(sum_dtype)
        # rounded to the output dtype as it is stored (the same values as computing in sum_dtype, then casting)
        rounded = None if out_dtype == sum_dtype else unscaled.new_empty(unscaled.shape, dtype=out_dtype)
        if bias is None:
            out = torch.mul(unscaled, scale_s_sum, out=rounded)
        else:  # PEFT's base bias stays out of the rescaling: + bias (1 - scale)
            out = torch.addcmul((bias - bias * (scale_s / s)).to(sum_dtype), unscaled, scale_s_sum, out=rounded)
        ctx.base, ctx.four_bit, ctx.dtype, ctx.s, ctx.same, ctx.ac = base, four_bit, dtype, s, x_drop is None, ac
        ctx.x_dtype, ctx.x_drop_dtype, ctx.a_dtype, ctx.b_dtype, ctx.m_dtype = (
            x.dtype, None if x_drop is None else x_drop.dtype, a.dtype, b.dtype, m.dtype)
        # a cast of the base weight (an fp32 base under autocast) is kept for the input gradient, as autograd keeps
        # the one autocast makes for a plain Linear: casting again in the backward was a pass over W LoRA does not make
        w_cast = w if (not four_bit and w is not base.weight and ctx.needs_input_grad[0]) else None
        ctx.save_for_backward(x_lr, lora_a_out, unscaled, a_lr, b, scale_s, s_over_norm, w_cast)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.ac is None:
            return DoraLinear._backward(ctx, g)
        with torch.autocast(g.device.type, enabled=False):
            return DoraLinear._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        # a, x_lr and lora_a_out in the low-rank compute dtype
        x_lr, lora_a_out, unscaled, a, b, scale_s, s_over_norm, w_cast = ctx.saved_tensors
        need_x, need_xd, need_a, need_b, need_m = ctx.needs_input_grad[:5]
        base, s, lr_dtype = ctx.base, ctx.s, lora_a_out.dtype
        none = (None,) * 6
        grad_x = grad_xd = grad_a = grad_b = grad_m = None
        if need_m:  # dL/dm = (s / norm) sum_n g (u - bias / s), per row, in fp32
            f32 = s_over_norm.dtype
            if g.dtype == f32 == unscaled.dtype:
                g_dot_u = torch.linalg.vecdot(g, unscaled, dim=0)
            elif unscaled.dtype == f32:  # (g * u).sum(0): vecdot's values (on a GPU g is widened inside the mul)
                g_dot_u = torch.mul(g, unscaled).sum(0)
            else:
                g_dot_u = torch.linalg.vecdot(g.to(f32), unscaled.to(f32), dim=0)
            if base.bias is not None:
                g_dot_u = g_dot_u.sub_(g.to(f32).sum(0).mul_(base.bias.to(f32)), alpha=1 / s)
            grad_m = g_dot_u.mul_(s_over_norm)
            if grad_m.dtype != ctx.m_dtype:
                grad_m = grad_m.to(ctx.m_dtype)
        need_h = need_a or need_xd or (need_x and ctx.same)
        if not (need_b or need_h or need_x):
            return grad_x, grad_xd, grad_a, grad_b, grad_m, *none
        w = None
        if need_x:
            w = dequantize_4bit(base, ctx.dtype) if ctx.four_bit else (w_cast if w_cast is not None else base.weight)
            if w.dtype != ctx.dtype:
                w = w.to(ctx.dtype)
        # a fresh tensor may be scaled in place (not the forward's saved cast: a second backward reads it again)
        own_w = w is not None and w is not w_cast and (ctx.four_bit or w is not base.weight)
        g_scaled = None
        if w is None or g.shape[0] <= w.shape[1]:
            # the scale s' on g (n x out), once for every product that needs it
            g_scaled = g * (scale_s if scale_s.dtype == g.dtype else scale_s.to(g.dtype))
            g_scaled_lr = g_scaled if g_scaled.dtype == lr_dtype else g_scaled.to(lr_dtype)
            grad_b = g_scaled_lr.t() @ lora_a_out if need_b else None
            grad_h = g_scaled_lr @ (b if b.dtype == lr_dtype else b.to(lr_dtype)) if need_h else None
        else:
            # more rows than W has columns: the scale goes on W's rows (out x in; on a 4-bit base the fresh
            # dequantization, in place) and on B (out x r) instead
            scale_s_col = scale_s.to(ctx.dtype).unsqueeze(1)
            w = w.mul_(scale_s_col) if own_w else w * scale_s_col
            g_lr = g if g.dtype == lr_dtype else g.to(lr_dtype)
            scale_s_lr = scale_s.to(lr_dtype).unsqueeze(1)
            grad_b = (g_lr.t() @ lora_a_out).mul_(scale_s_lr) if need_b else None
            grad_h = g_lr @ (b.to(lr_dtype) * scale_s_lr) if need_h else None
        if grad_b is not None and grad_b.dtype != ctx.b_dtype:
            grad_b = grad_b.to(ctx.b_dtype)
        if need_a:
            grad_a = grad_h.t() @ x_lr
            if grad_a.dtype != ctx.a_dtype:
                grad_a = grad_a.to(ctx.a_dtype)
        if need_x:
            # (g s' / s) W [+ grad_h A]
            g_for_x = g_scaled if g_scaled is not None else g
            if g_for_x.dtype != ctx.dtype:
                g_for_x = g_for_x.to(ctx.dtype)
            if ctx.same and grad_h.dtype == ctx.dtype == a.dtype:
                grad_x = (grad_h @ a).addmm_(g_for_x, w, alpha=1 / s)
            else:
                grad_x = torch.mm(g_for_x, w)
                if s != 1:
                    grad_x = grad_x.mul_(1 / s)
                if ctx.same:
                    grad_x = grad_x + (grad_h @ a).to(grad_x.dtype)
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
        if need_xd:
            grad_xd = grad_h @ a
            if grad_xd.dtype != ctx.x_drop_dtype:
                grad_xd = grad_xd.to(ctx.x_drop_dtype)
        return grad_x, grad_xd, grad_a, grad_b, grad_m, *none
