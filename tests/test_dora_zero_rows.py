"""Base rows of norm 0 (peft#2049): PEFT's own DoRA gives NaN on them; prefopt's fast forward, its guarded PEFT
forward, the merge and a whole SFT -> DPO -> merge run stay finite, and the rows are counted (docs/dora.md, "Base
rows of norm 0")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import chain_recipe
from safetensors.torch import load_file, save_file
from torch import nn

import prefopt
from prefopt import dora
from prefopt.dora.zero_rows import module_names
from prefopt.merging.stream import merge_adapter
from prefopt.models import attach_adapter, base_info, build_lora_config, load_base_model

ZERO_ROWS = [2, 5]  # of the 16 -> 8 Linear
ZEROED = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")  # 1/16 of their rows, in both decoder layers


# ---------------------------------------------------------------------------------------------- bases


class _Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _linear(quant: str, bias: bool) -> nn.Module:
    """A 16 -> 8 Linear (NF4 or not) whose rows ZERO_ROWS are 0."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=bias)
    with torch.no_grad():
        lin.weight[ZERO_ROWS] = 0
        if bias:
            lin.bias.normal_()
    if quant == "nf4":
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(16, 8, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        if bias:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        lin = q.to("cpu")  # quantizes
        assert lin.weight.quant_state is not None
    return _Wrap(lin)


def _peft(base: nn.Module, *, moved: bool = True):
    """PEFT's DoRA on the Linear, plain get_peft_model (no prefopt). `moved`: B and the magnitude away from their
    init everywhere but on the zero rows, which training leaves at 0 (their gradients are 0)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True))
    if moved:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            layer = model.base_model.model.lin
            b = layer.lora_B["default"].weight
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
            b[ZERO_ROWS] = 0
            m = layer.lora_magnitude_vector["default"].weight
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
    return model


def _step(model, x, g):
    """Output and every trainable tensor's gradient for the loss sum(out * g)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * g).sum().backward()
    return out.detach().clone(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _inputs():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(5, 16, generator=gen), torch.randn(5, 8, generator=gen)


@pytest.fixture(scope="module")
def zero_row_model(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A tiny random Llama saved with 1/16 of the rows of q_proj, gate_proj and down_proj set to 0, and the counts
    planted: {module name: rows}."""
    from conftest import DEMO_DATA
    from demo_assets import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("zero-rows") / "m", DEMO_DATA)
    tensors = load_file(str(path / "model.safetensors"))
    planted = {}
    for key, t in tensors.items():
        name = key.removesuffix(".weight")
        if name.endswith(ZEROED):
            rows = list(range(3, t.shape[0], 16))  # 1/16 of the rows
            t[rows] = 0
            planted[name] = len(rows)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert len(planted) == 6 and sum(planted.values()) == 2 * (4 + 8 + 4)
    return path, planted


# ---------------------------------------------------------------------------------------------- the forward


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_peft_dora_alone_gives_nan(quant, zero_row_model):
    """The reason for the guard: PEFT's own DoRA, fresh (step 0) or trained, is NaN on a base row of zeros."""
    x, _ = _inputs()
    for moved in (False, True):
        out = _peft(_linear(quant, bias=False), moved=moved)(x)
        assert out[:, ZERO_ROWS].isnan().all() and out[:, [0, 1, 3]].isfinite().all()
    from peft import get_peft_model

    path, _ = zero_row_model
    model = get_peft_model(load_base_model(str(path), quantization=quant, dtype="float32"), build_lora_config())
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.isnan().all()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_fast_and_guarded_peft_forwards_are_finite_and_agree(quant, bias):
    """The fast forward needs no guard; PEFT's needs prefopt's; then the two agree, the zero rows' outputs are the
    base's and their gradients are 0, and every other row is untouched."""
    x, g = _inputs()
    model = _peft(_linear(quant, bias))
    with model.disable_adapter(), torch.no_grad():
        base_out = model(x)
    assert dora.enable_fast_dora(model) == 1
    before = dora.path_counts()["fast"]
    fast_out, fast_grads = _step(model, x, g)
    assert dora.path_counts()["fast"] == before + 1  # the fast path, not a fallback to PEFT's
    dora.disable_fast_dora(model)
    assert _step(model, x, g)[0][:, ZERO_ROWS].isnan().all()  # PEFT's own forward, unguarded
    assert dora.guard_zero_rows(model, echo=None) == {"lin": 2}
    peft_out, peft_grads = _step(model, x, g)

    for out, grads in ((fast_out, fast_grads), (peft_out, peft_grads)):
        assert out.isfinite().all() and all(t.isfinite().all() for t in grads.values())
        torch.testing.assert_close(out[:, ZERO_ROWS], base_out[:, ZERO_ROWS], rtol=0, atol=0)  # (the bias, or 0)
        for name, grad in grads.items():
            if "lora_B" in name or "lora_magnitude" in name:
                assert (grad[ZERO_ROWS] == 0).all(), name
        assert all(t.abs().sum() > 0 for t in grads.values())  # the other rows still train
    torch.testing.assert_close(fast_out, peft_out, rtol=1e-5, atol=1e-6)
    for name in peft_grads:
        torch.testing.assert_close(fast_grads[name], peft_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adapters_added_later_are_guarded_and_start_from_peft_s_magnitude():
    """TRL's "ref" copy for DPO is an adapter PEFT adds after prefopt attached the model: guarded too, its magnitude
    initialised by PEFT (0 on a zero row, not the guard's inf)."""
    model = _peft(_linear("none", bias=False))
    dora.guard_zero_rows(model, echo=None)
    model.add_adapter("ref", model.peft_config["default"])
    layer = model.base_model.model.lin
    ref_mag = layer.lora_magnitude_vector["ref"].weight
    assert (ref_mag[ZERO_ROWS] == 0).all() and ref_mag.isfinite().all()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).copy_(p)
    x, _ = _inputs()
    model.set_adapter("ref")
    with torch.no_grad():
        ref_out = model(x)
        model.set_adapter("default")
        torch.testing.assert_close(ref_out, model(x), rtol=0, atol=0)
    assert ref_out.isfinite().all()


# ---------------------------------------------------------------------------------------------- counting


@pytest.mark.parametrize("impl", ["fast", "peft"])
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_find_zero_rows_counts_exactly_the_rows_zeroed(zero_row_model, tiny_model, quant, impl):
    path, planted = zero_row_model
    model = attach_adapter(load_base_model(str(path), quantization=quant, dtype="float32"), build_lora_config(),
                           dora_impl=impl)
    assert dora.find_zero_rows(model) == planted
    # counted from the base weight, not the magnitude (which equals ||W_i|| only at init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.fill_(1.0)
    assert dora.find_zero_rows(model) == planted
    # the same count from the checkpoint's safetensors, no model loaded (what `prefopt plan` can say)
    assert dora.zero_rows_in_checkpoint(path, module_names(model)) == planted
    said = []
    assert dora.guard_zero_rows(model, echo=said.append) == planted
    assert len(said) == 1 and said[0].startswith("prefopt: note: DoRA: 32 base rows of norm 0 in 6 modules "
                                                 "(model.layers.0.self_attn.q_proj: 4, model.layers.0.mlp.gate_proj: 8")
    clean = attach_adapter(load_base_model(str(tiny_model), quantization=quant, dtype="float32"), build_lora_config(),
                           dora_impl=impl)
    assert dora.find_zero_rows(clean) == {} and dora.zero_rows_in_checkpoint(tiny_model, module_names(clean)) == {}
    assert dora.zero_rows_note({}) is None
    assert dora.zero_rows_note({"m": 1}).startswith("DoRA: 1 base row of norm 0 in 1 module (m: 1): ")


def test_a_checkpoint_is_counted_without_loading_the_model(tmp_path, zero_row_model):
    """What `prefopt plan` can say: the module names from a weightless (meta-device) PEFT model, the rows read from
    the safetensors shards (an index and two shards here); the weightless model itself has nothing to count."""
    from peft import get_peft_model

    from prefopt.models import empty_model, load_config

    path, planted = zero_row_model
    meta = get_peft_model(empty_model(load_config(str(path))), build_lora_config())
    assert dora.find_zero_rows(meta) == {}
    tensors = load_file(str(path / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(tmp_path / name), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    assert dora.zero_rows_in_checkpoint(tmp_path, module_names(meta), rows_at_once=5) == planted


# ---------------------------------------------------------------------------------------------- the merge


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_merge_of_an_adapter_on_zero_rows_is_finite_and_verifies(tmp_path, zero_row_model, quant):
    """An adapter as training leaves it on such a base (B and the magnitude 0 on the zero rows, moved elsewhere):
    the merged rows are 0, every weight finite, and the merged model verifies against the adapter model."""
    path, planted = zero_row_model
    base = load_base_model(str(path), quantization=quant, dtype="float32")
    model = attach_adapter(base, build_lora_config(r=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
        for name, layer in model.named_modules():
            if name.removeprefix("base_model.model.") in planted:
                zero = (layer.lora_magnitude_vector["default"].weight == 0).nonzero().flatten()
                assert len(zero) == planted[name.removeprefix("base_model.model.")]
                layer.lora_B["default"].weight[zero] = 0
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    (adapter / "prefopt_base.json").write_text(json.dumps(
        base_info(base, name_or_path=str(path), quantization=quant, dtype="float32")))
    report = merge_adapter(adapter, tmp_path / "merged", out_dtype="float32", echo=lambda s: None)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert all(t.isfinite().all() for t in merged.values())
    for name, n in planted.items():
        assert int((merged[f"{name}.weight"].abs().sum(1) == 0).sum()) == n
    v = report["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["max_rel_logit_diff"] < 1e-4, v
    assert v["peft_forward"]["max_abs_logit_diff_vs_trained"] < 1e-3  # PEFT's forward, guarded, is finite too


# ---------------------------------------------------------------------------------------------- a whole run


@pytest.mark.parametrize(("quant", "impl"), [("nf4", "fast"), ("none", "fast"), ("none", "peft")])
def test_sft_dpo_merge_on_a_base_with_zero_rows(tmp_path, zero_row_model, small_data, quant, impl):
    """SFT -> DPO -> merge (verified) on the base with zero rows: finite losses and gradient norms at every step
    (PEFT's DoRA logged loss 0 and grad_norm nan), the rows said, the merged rows 0. With dora_impl: peft, DPO's
    "ref" adapter (added by TRL after the model is attached) runs PEFT's forward too."""
    path, planted = zero_row_model
    raw = chain_recipe(path, small_data, "dpo", quantization=quant)
    raw["adapter"]["dora_impl"] = impl
    for stage in raw["stages"]:
        stage["train"]["max_steps"] = 2
    raw["merge"] = {"dtype": "float32"}
    said = []
    result = prefopt.run(prefopt.recipe_from_dict(raw), output_dir=tmp_path / "run", echo=said.append)
    for stage in ("00-sft", "01-dpo"):
        history = json.loads((result.run_dir / "stages" / stage / "log_history.json").read_text())
        steps = [h for h in history if "loss" in h]
        assert len(steps) == 2
        for h in steps:
            assert math.isfinite(h["loss"]) and h["loss"] > 0 and math.isfinite(h["grad_norm"]), (stage, h)
    assert any("DoRA: 32 base rows of norm 0 in 6 modules" in line for line in said), said
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert all(s["metrics"]["dora_zero_rows"] == planted for s in manifest["stages"])  # every module, in run.json
    v = result.merge_report["verification"]
    assert v["passed"], v
    merged = load_file(str(result.merged / "model.safetensors"))
    assert all(t.isfinite().all() for t in merged.values())
    for name, n in planted.items():
        assert int((merged[f"{name}.weight"].abs().sum(1) == 0).sum()) == n
    final = load_file(str(result.final_adapter / "adapter_model.safetensors"))
    assert all(t.isfinite().all() for t in final.values())
