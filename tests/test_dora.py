"""The fast low-rank DoRA forward (prefopt.dora) against PEFT's own DoRA layer.

Every comparison runs the same model twice, once through PEFT's forward and once through prefopt's, on a
4-bit or unquantized base, with adapter weights moved away from their init (B != 0, magnitude != ||W||)
so that every term of the norm matters.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHAPES

from prefopt import dora
from prefopt.models import attach_adapter, build_lora_config, load_base_model, load_tokenizer
from prefopt.quant import dequantize

N_LAYERS = 2 * 7  # two decoder layers x (q, k, v, o, gate, up, down); models: conftest.shaped_models


def _model(path, quant="nf4", *, dropout=0.0, dtype="float32", impl="peft", mode="lowrank", seed=1):
    base = load_base_model(str(path), quantization=quant, dtype=dtype)
    model = attach_adapter(base, build_lora_config(r=8, alpha=16, dropout=dropout), dora_impl=impl,
                           dora_dropout=mode)
    _move_adapter(model, seed)
    return model


def _move_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _ids(n=3, t=17, seed=0):
    return torch.randint(3, 500, (n, t), generator=torch.Generator().manual_seed(seed))


def _step(model, ids, seed=123):
    """Loss, logits and the gradient of every trainable tensor; the dropout RNG is reseeded first."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().clone(), grads


def _assert_same(a, b, *, logit_tol=1e-5, grad_tol=5e-5):
    (la, ga), (lb, gb) = a, b
    assert (la - lb).abs().max().item() <= logit_tol * max(1.0, la.abs().max().item())
    assert ga.keys() == gb.keys() and len(ga) == 3 * N_LAYERS  # lora_A, lora_B, magnitude of every layer
    for k in ga:
        rel = ((ga[k] - gb[k]).abs().max() / ga[k].abs().max().clamp_min(1e-30)).item()
        assert rel <= grad_tol, f"gradient of {k}: relative difference {rel:.2e}"


def _fast_calls(fn):
    before = dora.path_counts()
    out = fn()
    return out, dora.path_counts()["fast"] - before["fast"], dora.path_counts()["fallback"] - before["fallback"]


@pytest.mark.parametrize("quant", ["nf4", "none"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_peft_forward_and_gradients(shaped_models, shape, quant):
    model = _model(shaped_models[shape], quant)
    model.train()
    ids = _ids(4, 33)  # 132 rows: more than most layers' in_features, fewer than the down projections'
    ref = _step(model, ids)
    assert dora.enable_fast_dora(model) == N_LAYERS
    got, fast, fallback = _fast_calls(lambda: _step(model, ids))
    assert (fast, fallback) == (N_LAYERS, 0)  # really took the low-rank path, on every layer
    _assert_same(ref, got)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_hooked_layers_take_the_general_path_and_still_match(shaped_models, quant):
    """Forward hooks on the base layers and lora_B (as offloading or ZeRO-3 add) rule out the shortcuts that
    bypass them; the general path (autograd through the joint base call, unfused rescale) gives PEFT's numbers."""
    from peft.tuners.lora import LoraLayer

    model = _model(shaped_models["bias"], quant, dropout=0.1)
    calls = []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.get_base_layer().register_forward_hook(lambda *a: calls.append(1))
            m.lora_B["default"].register_forward_hook(lambda *a: calls.append(1))
    model.train()
    ids = _ids()
    for mode in ("lowrank", "full"):
        dora.disable_fast_dora(model)
        ref = _step(model, ids, seed=5)
        dora.enable_fast_dora(model, mode)
        calls.clear()
        got = _step(model, ids, seed=5)
        assert len(calls) == 2 * N_LAYERS  # every hook still ran
        if mode == "full":
            _assert_same(ref, got)
        else:
            assert (ref[0] - got[0]).abs().max() > 1e-4  # different dropout semantics
    dora.disable_fast_dora(model)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        dora.enable_fast_dora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_full_dropout_matches_peft_with_the_same_masks(shaped_models):
    model = _model(shaped_models["h96"], "nf4", dropout=0.1)
    model.train()
    ids = _ids()
    ref = _step(model, ids, seed=7)
    dora.enable_fast_dora(model, "full")
    got = _step(model, ids, seed=7)
    _assert_same(ref, got)
    other_mask = _step(model, ids, seed=8)  # the masks matter: a different draw differs
    assert (other_mask[0] - got[0]).abs().max() > 1e-4


def _one_layer(model):
    from peft.tuners.lora import LoraLayer

    return next(m for m in model.modules() if isinstance(m, LoraLayer) and m.get_base_layer().bias is not None)


def test_lowrank_dropout_is_torchtune_semantics(shaped_models):
    """out = m/||W + sBA|| * (W x + s B A dropout(x)) + bias, checked on a layer with a bias, from dequantized W."""
    model = _model(shaped_models["bias"], "nf4", dropout=0.3, impl="fast", mode="lowrank")
    model.train()
    layer = _one_layer(model)
    base = layer.get_base_layer()
    x = torch.randn(5, base.in_features, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    xd = layer.lora_dropout["default"](x)
    assert not torch.equal(xd, x)

    w = dequantize(base).float()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    m = layer.lora_magnitude_vector["default"].weight
    norm = torch.linalg.norm(w + s * b @ a, dim=1)
    want = (m / norm) * (x @ w.t() + s * (xd @ a.t()) @ b.t()) + base.bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    dora.disable_fast_dora(model)  # PEFT's (full) semantics is a different function
    torch.manual_seed(11)
    assert (layer(x) - want).abs().max() > 1e-4


def test_int8_base_trains_and_matches_peft(shaped_models):
    """8-bit: W A^T from the int8 weight and its scales, leaving the layer untouched."""
    model = _model(shaped_models["h96"], "int8", impl="fast")
    model.train()
    ids = _ids()
    got, fast, _ = _fast_calls(lambda: _step(model, ids))
    assert fast == N_LAYERS
    again = _step(model, ids)  # a second forward works (PEFT's own DoRA dequantize breaks 8-bit layers on CPU)
    torch.testing.assert_close(again[0], got[0], rtol=0, atol=0)
    dora.disable_fast_dora(model)
    _assert_same(_step(model, ids), got)  # PEFT's first forward on a fresh layer


def test_bf16_compute_stays_close_to_peft(shaped_models):
    model = _model(shaped_models["h64"], "nf4", dtype="bfloat16")
    model.train()
    ids = _ids()
    ref = _step(model, ids)
    dora.enable_fast_dora(model)
    got = _step(model, ids)
    scale = ref[0].abs().max().item()
    assert (got[0].float() - ref[0].float()).abs().max().item() < 0.05 * scale
    for k in ref[1]:
        assert torch.isfinite(got[1][k]).all()
        cos = torch.nn.functional.cosine_similarity(got[1][k].flatten().float(), ref[1][k].flatten().float(), dim=0)
        assert cos > 0.95, k


def test_gradient_checkpointing_matches(shaped_models):
    model = _model(shaped_models["h64"], "nf4")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids = _ids()
    ref = _step(model, ids)
    dora.enable_fast_dora(model)
    got, fast, _ = _fast_calls(lambda: _step(model, ids))
    assert fast == 2 * N_LAYERS  # forward + recomputation in backward
    _assert_same(ref, got)


def _norms(fn):
    before = dora.path_counts()["norms"]
    out = fn()
    return out, dora.path_counts()["norms"] - before


def test_eval_cache_follows_weight_updates_and_generation_matches(shaped_models):
    path = shaped_models["h64"]
    model = _model(path, "nf4", impl="fast")
    model.eval()
    ids = _ids(2, 9)
    with torch.no_grad():
        y1, n1 = _norms(lambda: model(input_ids=ids).logits)
        y1b, n1b = _norms(lambda: model(input_ids=ids).logits)
        assert (n1, n1b) == (N_LAYERS, 0) and torch.equal(y1, y1b)  # the second is served from the cache
        # an in-place update, as an optimizer step makes, invalidates the cached norms
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        y2, n2 = _norms(lambda: model(input_ids=ids).logits)
    assert n2 == N_LAYERS and (y2 - y1).abs().max() > 1e-3
    tok = load_tokenizer(str(path))
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        fast_tokens = model.generate(input_ids=ids, **gen)
        dora.disable_fast_dora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, y2, rtol=1e-5, atol=1e-5)
        peft_tokens = model.generate(input_ids=ids, **gen)
    assert torch.equal(fast_tokens, peft_tokens)


def test_training_norms_once_per_optimizer_step(shaped_models):
    """Micro-batches of one accumulation window reuse the norms once an optimizer has stepped the adapter (before
    that nothing vouches for them: each training forward recomputes); the optimizer step invalidates them; writes
    through .data outside an optimizer need clear_norm_cache (TRL's "ref" copy is followed by one)."""
    model = _model(shaped_models["h64"], "nf4")
    model.train()
    ids = _ids()
    ref = [_step(model, ids)]  # PEFT, before any update
    dora.enable_fast_dora(model)
    (first, n_first), (second, n_second) = _norms(lambda: _step(model, ids)), _norms(lambda: _step(model, ids))
    assert (n_first, n_second) == (N_LAYERS, N_LAYERS)
    _assert_same(ref[0], first)
    _assert_same(ref[0], second)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    (after, n_after), (again, n_again) = _norms(lambda: _step(model, ids)), _norms(lambda: _step(model, ids))
    assert (n_after, n_again) == (N_LAYERS, 0)
    _assert_same(after, again)
    dora.disable_fast_dora(model)
    _assert_same(_step(model, ids), after)

    dora.enable_fast_dora(model)
    _step(model, ids)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.data.copy_(p.data * 1.5)  # invisible to the version counters
    _, n_stale = _norms(lambda: _step(model, ids))
    assert n_stale == 0  # documented caveat: the cache cannot see this write...
    dora.clear_norm_cache(model)
    got, n_fresh = _norms(lambda: _step(model, ids))
    assert n_fresh == N_LAYERS  # ...until cleared
    dora.disable_fast_dora(model)
    _assert_same(_step(model, ids), got)


def test_falls_back_to_peft_where_it_must(shaped_models):
    """Disabled adapters, several active adapters, mixed batches, merged weights: PEFT's answer (or error), not ours."""
    from peft import LoraConfig

    model = _model(shaped_models["h64"], "none", impl="peft")
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"))
    _move_adapter(model, seed=2)
    model.eval()
    ids = _ids(2, 9)

    def outputs():
        with torch.no_grad():
            out = {"default": model(input_ids=ids).logits}
            with model.disable_adapter():
                out["disabled"] = model(input_ids=ids).logits
            model.base_model.set_adapter(["default", "other"])
            out["both"] = model(input_ids=ids).logits
            model.base_model.set_adapter("other")
            out["other"] = model(input_ids=ids).logits
            other_b = [p for n, p in model.named_parameters() if "lora_B.other" in n]
            saved = [p.clone() for p in other_b]
            for p in other_b:  # an update of "other" only (each adapter has its own cache), undone below
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
            out["other updated"] = model(input_ids=ids).logits
            for p, v in zip(other_b, saved):
                p.copy_(v)
            model.base_model.set_adapter("default")
            out["default again"] = model(input_ids=ids).logits
            model.merge_adapter()
            out["merged"] = model(input_ids=ids).logits
            model.unmerge_adapter()
            out["unmerged"] = model(input_ids=ids).logits
        return out

    ref = outputs()
    dora.enable_fast_dora(model)
    got, fast, fallback = _fast_calls(outputs)
    assert fast == 5 * N_LAYERS  # default, other (twice), default again, unmerged
    assert fallback == 3 * N_LAYERS  # disabled, both, merged
    assert not torch.allclose(ref["other updated"], ref["other"])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
    # mixed-adapter batches reach PEFT, which refuses them for DoRA (last: PEFT leaves its hooks behind)
    with torch.no_grad(), pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(input_ids=ids, adapter_names=["default", "other"])


def test_saved_adapters_are_interchangeable_with_plain_peft(tmp_path, shaped_models):
    from peft import PeftModel
    from safetensors.torch import load_file

    path = shaped_models["h96"]
    ids = _ids(2, 11)
    fast = _model(path, "nf4", impl="fast")
    fast.save_pretrained(tmp_path / "fast")
    peft = _model(path, "nf4", impl="peft")
    peft.save_pretrained(tmp_path / "peft")
    a = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)
    assert json.loads((tmp_path / "fast" / "adapter_config.json").read_text())["use_dora"] is True

    fast.eval()
    with torch.no_grad():
        want = fast(input_ids=ids).logits
        # written by the fast path, read by plain PEFT
        plain = PeftModel.from_pretrained(load_base_model(str(path), quantization="nf4", dtype="float32"),
                                          str(tmp_path / "fast"))
        assert dora.fast_dora_layers(plain) == 0
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        # written by plain PEFT, trained on by the fast path
        back = attach_adapter(load_base_model(str(path), quantization="nf4", dtype="float32"),
                              build_lora_config(r=8, alpha=16, dropout=0.0), init_from=tmp_path / "peft")
        assert dora.fast_dora_layers(back) == N_LAYERS
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, peft.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_recipe_fields(small_data):
    from prefopt.config import recipe_from_dict
    from prefopt.errors import RecipeError

    def recipe(**adapter):
        return {"name": "r", "model": {"name_or_path": "x"}, "adapter": adapter,
                "stages": [{"name": "sft", "type": "sft", "data": {"path": str(small_data["sft"])}}]}

    r = recipe_from_dict(recipe())
    assert (r.adapter.dora_impl, r.adapter.dora_dropout) == ("fast", "lowrank")
    assert recipe_from_dict(recipe(dora_impl="peft")).adapter.dora_dropout == "full"
    with pytest.raises(RecipeError, match="dora_dropout: lowrank needs dora_impl: fast"):
        recipe_from_dict(recipe(dora_impl="peft", dora_dropout="lowrank"))
    with pytest.raises(RecipeError, match="dora_impl"):
        recipe_from_dict(recipe(dora_impl="triton"))


def test_sft_stage_trains_identically_with_fast_full_and_peft(tmp_path, tiny_model, small_data):
    """A real SFTTrainer stage, adapter dropout 0.05, gradient accumulation and checkpointing on: fast+full and
    PEFT give the same losses and adapter (the fast path reuses its cached norms between micro-batches)."""
    from conftest import chain_recipe
    from safetensors.torch import load_file

    import prefopt
    from prefopt import recipe_from_dict

    runs = {}
    for impl, mode in (("peft", "full"), ("fast", "full"), ("fast", "lowrank")):
        raw = chain_recipe(tiny_model, small_data, None)
        raw["adapter"].update(dora_impl=impl, dora_dropout=mode)
        # the recipes' default optimizer (fused AdamW): it moves no version counter, so a norm cache keyed on them
        # went stale after the first step (4.6e-4 apart); SGD, which moves them, hid that
        raw["stages"][0]["train"].update(batch_size=2, grad_accum=2, gradient_checkpointing=True)
        before = dora.path_counts()
        result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / f"{impl}-{mode}")
        assert (dora.path_counts()["fast"] > before["fast"]) == (impl == "fast")
        history = json.loads((result.run_dir / "stages" / "00-sft" / "log_history.json").read_text())
        runs[impl, mode] = ([h["loss"] for h in history if "loss" in h],
                            load_file(result.adapters["sft"] / "adapter_model.safetensors"))
    (peft_loss, peft_ad), (fast_loss, fast_ad), (low_loss, low_ad) = runs.values()
    assert len(peft_loss) == 4
    assert fast_loss == pytest.approx(peft_loss, rel=1e-5)
    assert peft_ad.keys() == fast_ad.keys()
    for k in peft_ad:
        torch.testing.assert_close(fast_ad[k], peft_ad[k], rtol=1e-4, atol=1e-5, msg=k)
    # lowrank is a different (documented) dropout semantics: it trains, to a different adapter
    assert max((low_ad[k] - peft_ad[k]).abs().max().item() for k in peft_ad) > 1e-4


def test_second_backward_through_the_same_graph(shaped_models):
    """retain_graph=True works as with PEFT: the one-node backward leaves its saved tensors intact."""
    model = _model(shaped_models["h64"], "nf4")
    dora.enable_fast_dora(model)
    model.train()
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, first[n], rtol=0, atol=0, msg=n)
