"""Fast DoRA while training: the norm it uses is the norm of the current weights under every optimizer and
every way weights get written, under autocast, and under torch.compile.

Each test trains the same model twice from the same weights, once through PEFT's DoRA forward and once through
prefopt's, and compares what a user sees (per-step losses, gradients, the norm in use).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_dora import N_LAYERS, _ids, _model, _step

from prefopt import dora
from prefopt.quant import dequantize


def _optimizer(name, params, lr):
    if name == "adamw_fused":  # transformers' adamw_torch_fused, the recipes' default
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if name == "adamw_single":  # transformers' adamw_torch on CPU
        return torch.optim.AdamW(params, lr=lr, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr * 10)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_bnb_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, min_8bit_size=1024)  # the tiny model's tensors are small: 8-bit state for most
    raise ValueError(name)


class _UserSGD:
    """A user's own optimizer that is no torch.optim.Optimizer and writes through .data (no hook, no version)."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-self.lr)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


OPTIMIZERS = ["adamw_fused", "adamw_foreach", "adamw_single", "sgd", "adafactor", "adamw_bnb_8bit",
              "paged_adamw_8bit", "user_data_sgd"]


def _train(model, opt_name, *, steps=8, micro=2, lr=1e-2, after_step=None):
    """Per-step losses (mean over `micro` micro-batches) and the norms computed per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _UserSGD(params, lr * 10) if opt_name == "user_data_sgd" else _optimizer(opt_name, params, lr)
    losses, norms = [], []
    model.train()
    for step in range(steps):
        before = dora.path_counts()["norms"]
        total = 0.0
        for k in range(micro):
            ids = _ids(2, 17, seed=k)  # the same micro-batches every step: the loss must fall
            loss = model(input_ids=ids, labels=ids).loss / micro
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        norms.append(dora.path_counts()["norms"] - before)
        if after_step is not None:
            after_step(step)
    return losses, norms


def _pair(path, quant="none"):
    torch.manual_seed(0)
    peft = _model(path, quant)
    torch.manual_seed(0)
    fast = _model(path, quant)
    assert dora.enable_fast_dora(fast) == N_LAYERS
    return peft, fast


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_per_step_losses_match_peft_under_every_optimizer(shaped_models, opt_name):
    """lr 1e-2 moves the norm every step; a stale norm shows in the losses within a few steps (fused AdamW and
    bitsandbytes' 8-bit AdamW leave the version counters alone: 2.4e-2 relative before the fix)."""
    peft, fast = _pair(shaped_models["h64"])
    want, _ = _train(peft, opt_name)
    got, norms = _train(fast, opt_name)
    assert got == pytest.approx(want, rel=1e-5), opt_name
    assert want[-1] < want[0] - 0.05  # it trained: the comparison is not between two frozen models
    if opt_name == "user_data_sgd":
        assert all(n == 2 * N_LAYERS for n in norms)  # no step it can see: recomputed every forward
    else:
        # once per layer per optimizer step; the first accumulation window recomputes per micro-batch (no
        # optimizer has vouched for these tensors yet)
        assert norms == [2 * N_LAYERS] + [N_LAYERS] * (len(norms) - 1)


def _norm_from_scratch(layer):
    w = dequantize(layer.get_base_layer()).float()
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    s = layer.scaling["default"]
    return torch.linalg.norm(w + s * b @ a, dim=1)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_norm_in_use_is_the_norm_of_the_current_weights(shaped_models, quant):
    """After every optimizer step (the recipes' fused AdamW), the norm the next forward uses is ||W + s B A||
    computed from scratch."""
    from peft.tuners.lora import LoraLayer

    _, fast = _pair(shaped_models["h96"], quant)
    layers = [m for m in fast.modules() if isinstance(m, LoraLayer)]
    checked = []

    def check(step):
        ids = _ids(1, 5, seed=999)
        fast(input_ids=ids, labels=ids).loss.backward()  # a forward that uses (and refreshes) the norm
        fast.zero_grad(set_to_none=True)
        for layer in layers:
            plan = layer._prefopt_cur  # the fast forward's cached norm: this test is about that internal
            s = layer.scaling["default"]
            torch.testing.assert_close(s / plan.s_over_norm, _norm_from_scratch(layer), rtol=1e-5, atol=1e-6)
        checked.append(step)

    _train(fast, "adamw_fused", steps=4, after_step=check)
    assert checked == [0, 1, 2, 3]


def test_writes_outside_an_optimizer_are_seen(shaped_models, tmp_path):
    """load_state_dict, PEFT's set_peft_model_state_dict (what adapter loading and checkpoint resume use) and a
    plain in-place write all give the norm of the new weights, in training and in eval."""
    from peft import set_peft_model_state_dict

    peft, fast = _pair(shaped_models["h64"], "nf4")
    _train(fast, "adamw_fused", steps=2)  # cached norms, stamped by an optimizer
    ids = _ids(2, 9)
    trained = {n: p.detach().clone() for n, p in fast.named_parameters() if p.requires_grad}
    moved = {n: v * 1.5 if "lora_A" in n else v for n, v in trained.items()}

    def as_peft(state):  # set_peft_model_state_dict's names: no adapter name, the magnitude without ".weight"
        return {n.replace(".default.weight", ".weight")
                 .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v for n, v in state.items()}

    for how in ("set_peft_model_state_dict", "load_state_dict", "inplace"):
        for mode in ("train", "eval"):
            for state in (trained, moved):
                getattr(fast, mode)()
                getattr(peft, mode)()
                with torch.no_grad():
                    fast(input_ids=ids)  # fill the cache with the weights before the write
                    for model in (fast, peft):
                        if how == "set_peft_model_state_dict":
                            set_peft_model_state_dict(model, as_peft(state))
                        elif how == "load_state_dict":
                            model.load_state_dict(state, strict=False)
                        else:
                            params = dict(model.named_parameters())
                            for n, v in state.items():
                                params[n].copy_(v)
                    torch.testing.assert_close(fast(input_ids=ids).logits, peft(input_ids=ids).logits,
                                               rtol=1e-5, atol=1e-5, msg=f"{how} {mode}")


def _autocast_step(model, ids, dtype=torch.bfloat16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                         if p.requires_grad}


def _cos(u, v):
    return torch.nn.functional.cosine_similarity(u.flatten().float(), v.flatten().float(), dim=0).item()


def _bf16_grads_close(got, want, fp32) -> list[float]:
    """Every gradient within bf16 rounding of PEFT's under the same autocast: cosine >= 0.999 to PEFT's wherever
    bf16 rounding leaves PEFT's own gradient within 2e-4 of its fp32 one. Returns, for the others (noise-dominated:
    in a random tiny model with attention biases some q/k gradients are mostly bf16 noise, PEFT's own 0.994 from
    fp32, and two such noisy gradients are further from each other), how much further from fp32 ours are than
    PEFT's, in cosine (negative: further), for _assert_noisy_gaps."""
    assert want.keys() == got.keys() and len(got) == 3 * N_LAYERS
    gaps = []
    for k in want:
        assert got[k].dtype == torch.float32  # fp32 adapters get fp32 gradients
        peft_floor = _cos(want[k], fp32[k])
        if peft_floor >= 0.9998:
            assert _cos(got[k], want[k]) >= 0.999, f"{k}: cosine {_cos(got[k], want[k]):.5f} to PEFT's"
        else:
            gaps.append(_cos(got[k], fp32[k]) - peft_floor)
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert _cos(flat(got), flat(want)) >= 0.9999
    return gaps


def _assert_noisy_gaps(gaps: list[float]) -> None:
    """The noise-dominated gradients, pooled over the input batches tested: on average no further from fp32 than
    PEFT's by more than 1.2e-3 in cosine, none by more than 0.012.

    (Until 2026-12-06: each within 2e-3, from one batch. That bound sat inside the gap's own spread over batches:
    the same code failed it at -0.00226 (nf4, bias, batch 0) on a CPU without native bf16 (AVX2), having passed on
    an AVX-512 CPU; over batches 0-7 the gaps span -0.008 to +0.002, and summing PEFT's batch in two halves moves
    PEFT's own by <= 1e-5, so it is not summation order. Pooled over batches 0-3 the mean gap is -0.00054 (nf4)
    and +0.00037 (unquantized), while u kept in bf16 -- the regression this exists for,
    prefopt.dora.ops.AUTOCAST_SUM_DTYPE = bfloat16 -- gives -0.00197 and -0.00198, and a gap of -0.021.)"""
    if gaps:
        assert min(gaps) >= -0.012, f"a noisy gradient's cosine to fp32 is {min(gaps):.5f} below PEFT's"
        mean = sum(gaps) / len(gaps)
        assert mean >= -1.2e-3, f"noisy gradients: cosine to fp32 {mean:.5f} below PEFT's on average ({gaps})"


@pytest.mark.parametrize("shape,dtype", [("h96", torch.bfloat16), ("bias", torch.bfloat16), ("h96", torch.float16)])
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_bf16_autocast_matches_peft_on_the_one_node_path(shaped_models, quant, shape, dtype):
    """fp32 adapters under CPU bf16 (and fp16) autocast, the stand-in for the GPU's mixed precision: the one-node
    path is taken (its backward raised a dtype error before), its forward is close to PEFT's under the same
    autocast and its gradients are PEFT's within bf16 rounding, on four input batches."""
    peft, fast = _pair(shaped_models[shape], quant)
    gaps = []
    for seed in range(4):
        ids = _ids(4, 33, seed=seed)
        fp32 = _step(peft, ids)[1]
        want = _autocast_step(peft, ids, dtype)
        before = dora.path_counts()
        got = _autocast_step(fast, ids, dtype)
        assert dora.path_counts()["one_node"] - before["one_node"] == N_LAYERS
        assert dora.path_counts()["fallback"] == before["fallback"]
        assert (got[0] - want[0]).abs().max().item() < 0.02 * want[0].abs().max().item()
        gaps += _bf16_grads_close(got[1], want[1], fp32)
    _assert_noisy_gaps(gaps)


def test_bf16_autocast_general_path_matches_peft(shaped_models):
    """`full` dropout under autocast takes the general path (the layer's own base call); same masks, same
    answer as PEFT's within bf16 rounding."""
    torch.manual_seed(0)
    peft = _model(shaped_models["h96"], "nf4", dropout=0.1)
    torch.manual_seed(0)
    fast = _model(shaped_models["h96"], "nf4", dropout=0.1)
    dora.enable_fast_dora(fast, "full")
    ids = _ids()
    torch.manual_seed(3)
    fp32 = _step(peft, ids, seed=3)[1]
    torch.manual_seed(3)
    want = _autocast_step(peft, ids)
    torch.manual_seed(3)
    before = dora.path_counts()["one_node"]
    got = _autocast_step(fast, ids)
    assert dora.path_counts()["one_node"] == before
    assert (got[0] - want[0]).abs().max().item() < 0.02 * want[0].abs().max().item()
    _assert_noisy_gaps(_bf16_grads_close(got[1], want[1], fp32))


def _weight_casts(fn, shapes) -> int:
    """Dtype conversions (copy_ / _to_copy, nested ones included: a mixed-dtype op's own) of a tensor with one of
    `shapes` (the base weights') while `fn` runs, counted by the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in ("aten::copy_", "aten::_to_copy") and e.input_shapes
               and tuple(e.input_shapes[0]) in shapes)


@pytest.mark.parametrize("rows", [(4, 33), (1, 17)])  # more token rows than W has columns, and fewer
def test_autocast_backward_reuses_the_forwards_weight_cast(shaped_models, rows):
    """An fp32 base under bf16 autocast: the one-node backward uses the bf16 copy of W its forward made (as
    autograd keeps autocast's copy for a plain Linear), converting no weight again, and a second backward through
    the same graph gives the same gradients (the saved copy is not scaled in place)."""
    _, fast = _pair(shaped_models["h96"], "none")
    ids = _ids(*rows)
    shapes = {tuple(m.weight.shape) for n, m in fast.named_modules() if n.endswith("base_layer")}
    fast.zero_grad(set_to_none=True)
    before = dora.path_counts()["one_node"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fast(input_ids=ids, labels=ids).loss
    assert dora.path_counts()["one_node"] - before == N_LAYERS  # every layer took the one-node path
    casts = _weight_casts(lambda: loss.backward(retain_graph=True), shapes)
    assert casts == 0, f"{casts} weight casts in the backward"
    first = {n: p.grad.clone() for n, p in fast.named_parameters() if p.requires_grad}
    fast.zero_grad(set_to_none=True)
    loss.backward()
    for n, p in fast.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, first[n]), n


def _sft_losses(tmp_path, tiny_model, small_data, impl, mode, quant, trainer_kwargs=None, **train):
    from conftest import chain_recipe
    from safetensors.torch import load_file

    import prefopt

    raw = chain_recipe(tiny_model, small_data, None, quantization=quant)
    raw["adapter"].update(dora_impl=impl, dora_dropout=mode)
    raw["stages"][0]["train"] = {"max_steps": 5, "batch_size": 2, "max_length": 96, "logging_steps": 1, **train}
    raw["stages"][0]["trainer_kwargs"] = trainer_kwargs or {}
    before = dora.path_counts()
    result = prefopt.run(prefopt.recipe_from_dict(raw), output_dir=tmp_path / f"{impl}-{mode}-{quant}")
    if not trainer_kwargs:
        assert (dora.path_counts()["fast"] > before["fast"]) == (impl == "fast")
    history = json.loads((result.run_dir / "stages" / "00-sft" / "log_history.json").read_text())
    return ([h["loss"] for h in history if "loss" in h],
            load_file(result.adapters["sft"] / "adapter_model.safetensors"))


def test_prefopt_run_with_the_default_train_section_matches_peft(tmp_path, tiny_model, small_data):
    """`prefopt run` with the train section's defaults (fused AdamW, gradient accumulation 8, gradient
    checkpointing, cosine schedule with warmup), unquantized fp32, dropout 0.05 with PEFT's dropout semantics on
    both sides: fast and PEFT per-step losses agree within 1e-5 relative (1.9e-3 apart before the fix)."""
    kw = dict(learning_rate=5e-3)
    peft_loss, peft_ad = _sft_losses(tmp_path, tiny_model, small_data, "peft", "full", "none", **kw)
    fast_loss, fast_ad = _sft_losses(tmp_path, tiny_model, small_data, "fast", "full", "none", **kw)
    assert len(peft_loss) == 5
    assert fast_loss == pytest.approx(peft_loss, rel=1e-5)
    for k in peft_ad:
        torch.testing.assert_close(fast_ad[k], peft_ad[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("optim", ["adafactor", "adamw_bnb_8bit"])
def test_prefopt_run_matches_peft_with_other_optimizers(tmp_path, tiny_model, small_data, optim):
    """Optimizers transformers builds by name (outside torch's AdamW family) reach the same freshness."""
    kw = dict(learning_rate=5e-3, optim=optim, grad_accum=2, gradient_checkpointing=False)
    peft_loss, _ = _sft_losses(tmp_path, tiny_model, small_data, "peft", "full", "none", **kw)
    fast_loss, _ = _sft_losses(tmp_path, tiny_model, small_data, "fast", "full", "none", **kw)
    assert fast_loss == pytest.approx(peft_loss, rel=1e-5)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_torch_compile_trains(tmp_path, tiny_model, small_data, quant):
    """trainer_kwargs {torch_compile: true} (inductor, gradient checkpointing on): fast DoRA trains compiled, and as
    DoRA: while Dynamo traces, the layers run PEFT's forward, so the losses are compiled PEFT DoRA's; they stay
    within inductor's rounding of the eager run's."""
    kw = dict(learning_rate=5e-3, grad_accum=2, max_steps=3)
    eager_loss, _ = _sft_losses(tmp_path / "eager", tiny_model, small_data, "fast", "full", quant, **kw)
    compiled = {}
    for impl in ("fast", "peft"):
        compiled[impl], adapter = _sft_losses(tmp_path / "compiled", tiny_model, small_data, impl, "full", quant,
                                              trainer_kwargs={"torch_compile": True}, **kw)
        assert all(torch.isfinite(v).all() for v in adapter.values())
    assert compiled["fast"] == pytest.approx(compiled["peft"], rel=1e-5)
    assert compiled["fast"] == pytest.approx(eager_loss, rel=2e-3)
