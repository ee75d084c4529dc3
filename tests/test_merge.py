"""Streaming, DoRA-exact merge: formula, PEFT parity, shards, 4-bit fidelity, refusals, broken merges."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefopt.errors import MergeError
from prefopt.merging.stream import Thresholds, merge_adapter, read_adapter, stream_merge, verify
from prefopt.models import base_info, load_base_model
from prefopt.quant import roundtrip

LOOSE = Thresholds(max_rel_logit_diff=10, mean_kl=10, min_top1_agreement=0)


def make_adapter(base_dir: Path, out: Path, *, use_dora=True, quantization="none", seed=0, use_rslora=False) -> Path:
    """A saved adapter with random (non-zero) B and perturbed DoRA magnitudes, and its base record."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_base_model(str(base_dir), quantization=quantization, dtype="float32")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False,
                     use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    model.save_pretrained(str(out))
    (out / "prefopt_base.json").write_text(json.dumps(
        base_info(base, name_or_path=str(base_dir), quantization=quantization, dtype="float32")))
    return out


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    from conftest import DEMO_DATA
    from demo_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("sharded") / "m", DEMO_DATA, max_shard_size="200KB", seed=1)


def test_merged_tensors_equal_the_formula(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "a")
    out = tmp_path / "merged"
    merge_adapter(adapter, out, out_dtype="float32", verify_merge=False, echo=lambda s: None)
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    s = 8 / 4
    n_checked = 0
    for key, w in base.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        if prefix + ".lora_A.weight" not in ad:
            torch.testing.assert_close(merged[key], w, rtol=0, atol=0)  # untouched tensors copied as they are
            continue
        a, b, m = ad[prefix + ".lora_A.weight"], ad[prefix + ".lora_B.weight"], ad[prefix + ".lora_magnitude_vector"]
        v = w.double() + s * (b.double() @ a.double())
        expect = (m.double() / v.pow(2).sum(dim=1).sqrt())[:, None] * v
        torch.testing.assert_close(merged[key].double(), expect, rtol=1e-5, atol=1e-6)
        n_checked += 1
    assert n_checked == 14


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_streaming_merge_equals_peft_merge_and_unload(tmp_path, tiny_model, use_dora):
    from peft import PeftModel

    adapter = make_adapter(tiny_model, tmp_path / "a", use_dora=use_dora, use_rslora=not use_dora)
    out = tmp_path / "merged"
    merge_adapter(adapter, out, out_dtype="float32", verify_merge=False, echo=lambda s: None)
    ours = load_file(str(out / "model.safetensors"))
    base = load_base_model(str(tiny_model), quantization="none", dtype="float32")
    peft_merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for key, t in ours.items():
        torch.testing.assert_close(t, peft_merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_unquantized_merge_reproduces_adapter_logits(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "a")
    report = merge_adapter(adapter, tmp_path / "merged", out_dtype="float32", echo=lambda s: None)
    v = report["verification"]
    assert report["base_mode"] == "original"
    assert v["passed"] and v["max_abs_logit_diff"] < 1e-4 and v["top1_agreement"] == 1.0


def test_nf4_roundtrip_is_the_one_training_saw(tiny_model):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    model = load_base_model(str(tiny_model), quantization="nf4", dtype="float32")
    info = base_info(model, name_or_path=str(tiny_model), quantization="nf4", dtype="float32")
    assert info["bnb"] == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    raw = load_file(str(tiny_model / "model.safetensors"))
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    trained = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(roundtrip(raw["model.layers.1.mlp.down_proj.weight"], info), trained, rtol=0, atol=0)


def test_4bit_dequantized_merge_matches_and_original_shows_the_gap(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    deq = merge_adapter(adapter, tmp_path / "deq", echo=lambda s: None)  # auto -> dequantized, bf16 output
    assert deq["base_mode"] == "dequantized" and deq["out_dtype"] == "bfloat16"
    assert deq["verification"]["passed"], deq["verification"]
    orig = merge_adapter(adapter, tmp_path / "orig", base_mode="original", thresholds=LOOSE, echo=lambda s: None)
    assert orig["verification"]["mean_kl"] > 10 * deq["verification"]["mean_kl"]
    assert orig["verification"]["max_rel_logit_diff"] > deq["verification"]["max_rel_logit_diff"]


def test_dropped_magnitude_fails_verification(tmp_path, tiny_model, monkeypatch):
    import prefopt.merging.stream as merging

    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    real = merging.merged_weight
    monkeypatch.setattr(merging, "merged_weight", lambda w, a, b, s, m=None: real(w, a, b, s, None))
    with pytest.raises(MergeError, match="does not behave like the adapter model"):
        merge_adapter(adapter, tmp_path / "merged", echo=lambda s: None)
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert not report["verification"]["passed"]


def test_wrong_base_fails_verification(tmp_path, tiny_model, sharded_model):
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    info = json.loads((adapter / "prefopt_base.json").read_text())
    out = tmp_path / "merged"
    # merge into another model of the same shapes, then check against the adapter on its own base
    stream_merge(read_adapter(adapter), sharded_model, out, info=info, base_mode="dequantized", out_dtype="bfloat16")
    from prefopt.merging.stream import copy_side_files

    copy_side_files(tiny_model, adapter, out, "bfloat16")
    v = verify(out, adapter, info, tiny_model, None, Thresholds())
    assert not v["passed"] and v["failures"]


def test_sharded_base_merges_into_shards_with_index(tmp_path, sharded_model):
    from transformers import AutoModelForCausalLM

    src_index = json.loads((sharded_model / "model.safetensors.index.json").read_text())
    assert len(set(src_index["weight_map"].values())) > 1
    adapter = make_adapter(sharded_model, tmp_path / "a")
    out = tmp_path / "merged"
    report = merge_adapter(adapter, out, out_dtype="float32", echo=lambda s: None)
    assert report["verification"]["passed"]
    # small output shards: several of them, written as they fill
    import prefopt.merging.stream as merging

    info = json.loads((adapter / "prefopt_base.json").read_text())
    counts = merging.stream_merge(merging.read_adapter(adapter), sharded_model, tmp_path / "small", info=info,
                                  base_mode="original", out_dtype="float32", max_shard_bytes=100_000)
    assert counts["shards"] > 2
    small_index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert small_index["weight_map"].keys() == src_index["weight_map"].keys()
    whole = {}
    for f in out.glob("*.safetensors"):
        whole.update(load_file(str(f)))
    for key, shard in small_index["weight_map"].items():
        torch.testing.assert_close(load_file(str(tmp_path / "small" / shard))[key], whole[key], rtol=0, atol=0)
    AutoModelForCausalLM.from_pretrained(str(out))


def test_refusals(tmp_path, tiny_model, sharded_model):
    adapter = make_adapter(tiny_model, tmp_path / "a")
    # a DoRA adapter without its magnitude vectors is never merged as plain LoRA
    broken = tmp_path / "no-mag"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "magnitude" not in k}
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="DoRA adapter without its magnitude vector"):
        merge_adapter(broken, tmp_path / "o1", base=str(tiny_model), echo=lambda s: None)
    # shapes that do not match the base
    from conftest import DEMO_DATA
    from demo_assets import build_tiny_model

    wide = build_tiny_model(tmp_path / "wide", DEMO_DATA, hidden_size=128, intermediate_size=256)
    with pytest.raises(MergeError, match="adapter does not fit the base"):
        merge_adapter(adapter, tmp_path / "o2", base=str(wide), echo=lambda s: None)
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2*")), "nothing half-written"
    # an existing output folder
    (tmp_path / "o3").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        merge_adapter(adapter, tmp_path / "o3", echo=lambda s: None)
    merge_adapter(adapter, tmp_path / "o3", overwrite=True, verify_merge=False, echo=lambda s: None)


def test_cli_merge_and_output_loads_without_peft(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "prefopt.cli", "merge", "--adapter", str(adapter), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merge PASSED" in proc.stderr
    # the same merge again: current, nothing to do, exit 0 (issue 21; it was exit 2 "already exists")
    mtime = (out / "merge_report.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "is current" in again.stderr, again.stderr[-2000:]
    assert (out / "merge_report.json").stat().st_mtime_ns == mtime
    # another merge into the same folder is refused without --overwrite
    other = subprocess.run(cmd + ["--dtype", "float32"], capture_output=True, text=True)
    assert other.returncode == 2 and "already exists" in other.stderr and "--overwrite" in other.stderr
    assert "Traceback" not in other.stderr
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "chat_template.jinja").is_file() and (out / "merge_report.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("adapter_*"))
    code = ("import sys; sys.modules['peft'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
            "print(m(**t('hi', return_tensors='pt')).logits.shape, t.chat_template is not None)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "True" in proc.stdout
