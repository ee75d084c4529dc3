"""Merge verification: streamed block by block against the forward prefopt trained with, on the model's device;
a run folder without held-out rows says so."""

import json

import pytest
import torch
import yaml
from conftest import chain_recipe
from test_merge import make_adapter

import prefopt
from prefopt.merging.stream import Thresholds, merge_adapter
from prefopt.models import load_base_model, load_tokenizer


def _reference_logits(tiny_model, adapter, quantization, texts, fast):
    from peft import PeftModel

    from prefopt.dora import enable_fast_dora
    from prefopt.quant import harden_4bit_layers

    base = load_base_model(str(tiny_model), quantization=quantization, dtype="float32")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    harden_4bit_layers(model)
    if fast:
        enable_fast_dora(model, "lowrank")
    tok = load_tokenizer(str(tiny_model))
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.float(), enc


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_streamed_reference_is_the_trained_forward(tmp_path, tiny_model, quantization):
    """The block-by-block adapter model gives the logits of the whole adapter model as trained (fast DoRA on a
    4-bit base), and PEFT's forward is reported beside it."""
    from prefopt.merging.verify import Shards, adapter_hiddens, device

    adapter = make_adapter(tiny_model, tmp_path / "a", quantization=quantization)
    texts = ["Tell me about the sea.", "A kind word for a friend, please, and a longer one too."]
    want, enc = _reference_logits(tiny_model, adapter, quantization, texts, fast=True)
    info = json.loads((adapter / "prefopt_base.json").read_text())
    hiddens, head = adapter_hiddens(adapter, info, tiny_model, enc.to(device()), device(), dora_impl="fast",
                                    dora_dropout="lowrank")
    head = head[0:head.shape[0]]  # the whole head, read in training dtype and cast to fp32
    got = hiddens["trained"] @ head.T
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)
    peft_want, _ = _reference_logits(tiny_model, adapter, quantization, texts, fast=False)
    torch.testing.assert_close((hiddens["peft"] @ head.T)[mask], peft_want[mask], rtol=1e-4, atol=1e-4)
    assert "lm_head.weight" in Shards(tiny_model)


def test_report_names_reference_device_and_probe_source(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    lines = []
    report = merge_adapter(adapter, tmp_path / "m", echo=lines.append)
    v = report["verification"]
    assert v["passed"] and v["probe_source"] == "fixed prompts" and v["device"] == "cpu"
    assert v["reference"].startswith("prefopt's fast DoRA forward")
    assert set(v["peft_forward"]) >= {"max_abs_logit_diff", "mean_kl", "max_abs_logit_diff_vs_trained"}
    assert any("fixed prompts" in s and "on cpu" in s for s in lines), lines


def test_run_folder_merge_without_held_out_rows_says_so(tmp_path, tiny_model, small_data, monkeypatch):
    raw = chain_recipe(tiny_model, small_data, None)
    raw["stages"][0]["data"]["eval_fraction"] = 0
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    prefopt.run(prefopt.load_recipe(path), output_dir=out)
    # the run folder is self-contained: merge it from another folder, after the recipe's folder is gone
    path.unlink()
    monkeypatch.chdir(tmp_path.parent)
    lines = []
    report = prefopt.merge(out, echo=lines.append)
    v = report["verification"]
    assert v["probe_source"] == "fixed prompts" and "no held-out rows" in v["probe_note"]
    assert any("no held-out rows" in s and "fixed prompts" in s for s in lines), lines
    saved = json.loads((out / "merged" / "merge_report.json").read_text())
    assert "no held-out rows" in saved["verification"]["probe_note"]


def test_run_folder_recipe_runs_from_anywhere(tmp_path, tiny_model, small_data, monkeypatch):
    """recipe.yaml records absolute data/model paths and data hashes; plan and merge work from another folder,
    and a changed data file is refused."""
    import shutil

    data_dir = tmp_path / "proj" / "data"
    data_dir.mkdir(parents=True)
    shutil.copy(small_data["sft"], data_dir / "sft.jsonl")
    raw = chain_recipe(tiny_model, {"sft": "data/sft.jsonl"}, None)
    path = tmp_path / "proj" / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "proj" / "runs" / "x"
    prefopt.run(prefopt.load_recipe(path), output_dir=out)
    monkeypatch.chdir(tmp_path)
    recorded = prefopt.load_recipe(out / "recipe.yaml")
    assert recorded.stages[0].data.path == str((data_dir / "sft.jsonl").resolve())
    assert recorded.stages[0].data.sha256
    again = prefopt.run(recorded, output_dir=out)
    assert [s.skipped for s in again.stages] == [True], "the recorded recipe is the same run"
    # `prefopt run runs/x/recipe.yaml`, from another folder and without --output-dir, resumes runs/x
    from click.testing import CliRunner

    from prefopt.cli import main

    result = CliRunner().invoke(main, ["run", str(out / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    assert f"  run      {out}" in result.output and "sft: done and unchanged, skipped" in result.output
    assert not (tmp_path / "runs").exists()
    (data_dir / "sft.jsonl").write_text((data_dir / "sft.jsonl").read_text().replace("kind", "gentle"))
    with pytest.raises(prefopt.RecipeError, match=r"stages\[0\].data.sha256.*changed since the run"):
        prefopt.run(prefopt.load_recipe(out / "recipe.yaml"), output_dir=out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verification_runs_on_the_gpu(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    report = merge_adapter(adapter, tmp_path / "m", echo=lambda s: None, thresholds=Thresholds())
    assert report["verification"]["passed"] and report["verification"]["device"].startswith("cuda")
