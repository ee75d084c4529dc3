"""The chain on a real 4-bit DoRA base, real TRL trainers, real files: CPU, tiny model."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import chain_recipe
from safetensors.torch import load_file

import prefopt
from prefopt import dora, recipe_from_dict

LN2 = math.log(2)


def first_logged_step(run_dir: Path, stage_dir: str) -> dict:
    history = json.loads((run_dir / "stages" / stage_dir / "log_history.json").read_text())
    return next(h for h in history if "loss" in h)


def adapter_tensors(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def assert_moved(before: dict, after: dict):
    assert before.keys() == after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2, f"only {len(moved)}/{len(before)} adapter tensors changed"


def test_sft_then_dpo_reference_is_the_sft_model(tmp_path, tiny_model, small_data, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    recipe = recipe_from_dict(chain_recipe(tiny_model, small_data, "dpo", wandb="offline"))
    assert recipe.adapter.dora_impl == "fast"
    before = dora.path_counts()
    result = prefopt.run(recipe, output_dir=tmp_path / "run")
    run_dir = result.run_dir
    # every adapted-layer forward of both stages (policy and the "ref" copy) took the fast DoRA path
    assert dora.path_counts()["fast"] > before["fast"] and dora.path_counts()["fallback"] == before["fallback"]

    # Step 0 of DPO: policy == reference (the SFT model), so loss = ln 2 and every reward is 0.
    step0 = first_logged_step(run_dir, "01-dpo")
    assert step0["loss"] == pytest.approx(LN2, abs=1e-4)
    assert abs(step0["rewards/margins"]) < 1e-6
    assert abs(step0["rewards/chosen"]) < 1e-6 and abs(step0["rewards/rejected"]) < 1e-6

    # One adapter runs through the chain: same keys, SFT moved it off its init, DPO moved it again.
    sft, dpo = adapter_tensors(result.adapters["sft"]), adapter_tensors(result.adapters["dpo"])
    assert any("lora_magnitude_vector" in k for k in dpo), "DoRA magnitude is saved"
    assert not any(".ref." in k or "ref" in k.split(".") for k in dpo), "TRL's reference copy is not saved"
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sft.items())
    assert_moved(sft, dpo)

    manifest = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "done"]
    assert manifest["stages"][1]["starts_from"] == "stages/00-sft/adapter"
    assert manifest["stages"][1]["reference"] == "previous_stage"
    assert "eval_rewards/accuracies" in manifest["stages"][1]["metrics"]["eval"]
    assert (run_dir / "recipe.yaml").is_file()
    # the run folder's recipe is the resolved one, plus each data file's content hash (checked on a rerun)
    from prefopt.runs.folder import file_hash

    recorded = prefopt.load_recipe(run_dir / "recipe.yaml").to_dict()
    for st, path in zip(recorded["stages"], (small_data["sft"], small_data["prefs"])):
        assert st["data"].pop("sha256") == file_hash(str(path))
        st["data"]["sha256"] = None
    assert recorded == recipe.to_dict()

    # the data step's report and review sample sit in each stage folder; run.json carries the counts
    for k, name in enumerate(("00-sft", "01-dpo")):
        report = json.loads((run_dir / "stages" / name / "data_report.json").read_text())
        entry = manifest["stages"][k]["data"]
        assert entry["train_rows"] == report["train_rows"] and entry["eval_rows"] == report["eval_rows"]
        assert report["input_rows"] == 40 and report["token_checks"]
        assert report["train_rows"] + report["eval_rows"] + sum(report["dropped"].values()) == 40
        review = (run_dir / "stages" / name / "review_sample.jsonl").read_text().splitlines()
        assert len(review) == min(20, report["train_rows"])

    # W&B: one offline run per stage, grouped, holding the trainer's metrics; no key anywhere.
    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    blobs = [r.read_bytes() for r in runs]
    assert any(b"train/loss" in b and b"sft" in b for b in blobs)
    assert any(b"train/rewards/margins" in b and b"eval/rewards/accuracies" in b for b in blobs)
    group = f"chain-{manifest['run_id']}".encode()
    assert all(group in b for b in blobs)
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"API key written to {f}"


def test_reference_base_is_not_the_sft_model(tmp_path, tiny_model, small_data, capsys):
    """The counter-check: with reference: base, step 0 is NOT ln 2 -- so the test above can fail."""
    recipe = recipe_from_dict(chain_recipe(tiny_model, small_data, "dpo", reference="base"))
    result = prefopt.run(recipe, output_dir=tmp_path / "run")
    step0 = first_logged_step(result.run_dir, "01-dpo")
    assert abs(step0["rewards/chosen"]) > 1e-4
    assert "reference: the BASE model" in capsys.readouterr().err  # (the API speaks on stderr, as the CLI)


@pytest.mark.parametrize("reference", ["previous_stage", "base"])
def test_precomputed_reference_log_probs(tmp_path, tiny_model, small_data, reference):
    recipe = recipe_from_dict(chain_recipe(tiny_model, small_data, "dpo", reference=reference,
                                           precompute_ref_log_probs=True))
    result = prefopt.run(recipe, output_dir=tmp_path / "run")
    step0 = first_logged_step(result.run_dir, "01-dpo")
    if reference == "previous_stage":
        assert step0["loss"] == pytest.approx(LN2, abs=1e-4) and abs(step0["rewards/margins"]) < 1e-6
    else:
        assert abs(step0["rewards/chosen"]) > 1e-4


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_sft_then_reference_free_methods(tmp_path, tiny_model, small_data, method):
    recipe = recipe_from_dict(chain_recipe(tiny_model, small_data, method))
    result = prefopt.run(recipe, output_dir=tmp_path / "run")
    assert_moved(adapter_tensors(result.adapters["sft"]), adapter_tensors(result.adapters[method]))
    history = json.loads((result.run_dir / "stages" / f"01-{method}" / "log_history.json").read_text())
    assert any("rewards/accuracies" in h for h in history)
    if method == "orpo":
        assert any("log_odds_ratio" in h for h in history)


def test_preference_stage_alone_starts_a_fresh_adapter_against_the_base(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["stages"] = raw["stages"][1:]
    result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run")
    step0 = first_logged_step(result.run_dir, "00-dpo")
    # A fresh DoRA adapter is the identity (B = 0), so the policy equals the base reference at step 0.
    assert step0["loss"] == pytest.approx(LN2, abs=1e-4)
    assert json.loads((result.run_dir / "run.json").read_text())["stages"][0]["reference"] == "base"


def _base_state(model) -> dict:
    """Every frozen base tensor, the packed 4-bit weights and their quantization statistics included."""
    state = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        state[name] = p.detach().clone()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            state[name + ".absmax"] = qs.absmax.clone()
            if qs.state2 is not None:
                state[name + ".absmax2"] = qs.state2.absmax.clone()
    return state


def _adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".ref." not in n}


def test_frozen_4bit_base_never_changes_and_adapter_moves(tmp_path, tiny_model, small_data):
    """Each stage, through the Python API on our own model: base bit-identical, adapter moved."""
    from prefopt.data import load_stage_data
    from prefopt.models import attach_adapter, build_lora_config, load_base_model, load_tokenizer

    recipe = recipe_from_dict(chain_recipe(tiny_model, small_data, "dpo"))
    model = attach_adapter(load_base_model(str(tiny_model), quantization="nf4", dtype="float32"),
                           build_lora_config(r=8, alpha=16))
    assert dora.fast_dora_layers(model) == 14  # the fast DoRA path is on by default
    tok = load_tokenizer(str(tiny_model))
    base0, adapter = _base_state(model), _adapter_state(model)
    assert any(".absmax" in k for k in base0)
    for _i, stage in enumerate(recipe.stages):
        data = load_stage_data(stage, seed=0)
        metrics = prefopt.train_stage(stage, model, tok, data.train.to_list(), data.eval.to_list(),
                                      output_dir=tmp_path / stage.name)
        assert "train_loss" in metrics["train"]
        base1 = _base_state(model)
        assert base1.keys() == base0.keys()
        for k in base0:
            torch.testing.assert_close(base1[k], base0[k], rtol=0, atol=0, msg=f"base tensor {k} changed")
        now = _adapter_state(model)
        assert_moved(adapter, now)
        adapter = now
        assert (tmp_path / stage.name / "adapter" / "adapter_model.safetensors").is_file()


def test_unquantized_base_chain(tmp_path, tiny_model, small_data):
    recipe = recipe_from_dict(chain_recipe(tiny_model, small_data, "dpo", quantization="none"))
    result = prefopt.run(recipe, output_dir=tmp_path / "run")
    step0 = first_logged_step(result.run_dir, "01-dpo")
    assert step0["loss"] == pytest.approx(LN2, abs=1e-4)
