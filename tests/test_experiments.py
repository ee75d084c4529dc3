"""Issue 25's experiment tools: early stopping with the best checkpoint, and the data-size guidance in the plan."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST_TRAIN, chain_recipe
from safetensors.torch import load_file

import prefopt
from prefopt import recipe_from_dict
from prefopt.cli import main

LN2 = math.log(2)


def _plateau(raw, **es):
    """SFT over 4 epochs, evaluated each epoch, watching a metric that gets worse after the first evaluation: the
    held-out loss, which falls, under mode max. With patience 1 it stops after the second evaluation (epoch 2 of 4),
    and the best checkpoint is epoch 1's."""
    tr = raw["stages"][0]["train"]
    tr.update(max_steps=-1, epochs=4, early_stopping={"patience": 1, "mode": "max", **es})
    raw["stages"][0]["data"]["eval_fraction"] = 0.2


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_model, small_data):
    """Through prefopt.train_stage (the trainer's checkpoints stay on disk): training stops before its last epoch,
    and the adapter written is the best step's checkpoint, not the last step's weights."""
    from prefopt.data import prepare_stage
    from prefopt.models import ModelSpec, build_lora_config, load_model

    raw = chain_recipe(tiny_model, small_data, None)
    _plateau(raw)
    recipe = recipe_from_dict(raw)
    st = recipe.stages[0]
    _, tok_model, tok = load_model(ModelSpec(str(tiny_model), "nf4", "float32"), build_lora_config(r=8, alpha=16))
    data = prepare_stage(st, seed=0, tokenizer=tok, max_length=st.train.max_length)
    out = tmp_path / "stage"
    metrics = prefopt.train_stage(st, tok_model, tok, data.train, data.eval, output_dir=out)
    es = metrics["early_stopping"]
    per_epoch = math.ceil(len(data.train) / st.train.batch_size)
    assert es["stopped"] == "early" and es["evaluations"] == 2 and metrics["train"]["steps"] == 2 * per_epoch
    assert es["best_step"] == per_epoch, es
    best = load_file(str(out / "trainer" / f"checkpoint-{per_epoch}" / "adapter_model.safetensors"))
    last = load_file(str(out / "trainer" / f"checkpoint-{2 * per_epoch}" / "adapter_model.safetensors"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == best.keys()
    assert all(torch.equal(saved[k], best[k]) for k in saved), "the adapter written is the best checkpoint's"
    assert not all(torch.equal(saved[k], last[k]) for k in saved), "(and not the last step's: the test can fail)"


def test_the_next_stage_starts_from_the_best_adapter(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    _plateau(raw)
    result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run")
    manifest = json.loads((result.run_dir / "run.json").read_text())
    es = manifest["stages"][0]["metrics"]["early_stopping"]
    assert es["stopped"] == "early" and es["metric"] == "eval_loss" and "did not improve" in es["why"]
    first = next(h for h in json.loads((result.run_dir / "stages" / "01-dpo" / "log_history.json").read_text())
                 if "loss" in h)
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)  # DPO's reference: the adapter SFT handed on


def test_early_stopping_is_on_by_default_for_small_sft_stages_only(tmp_path, tiny_model, small_data, capsys):
    from prefopt.advice import early_stopping

    raw = chain_recipe(tiny_model, small_data, "dpo")
    recipe = recipe_from_dict(raw)
    sft, dpo = recipe.stages
    assert early_stopping(sft, 300, True)[0] is None  # max_steps set: the schedule is the recipe's
    sft.train.max_steps = -1
    assert early_stopping(sft, 300, True)[0].metric == "eval_loss"
    assert early_stopping(sft, 1000, True)[0] is None and early_stopping(sft, 300, False)[0] is None
    dpo.train.max_steps = -1
    assert early_stopping(dpo, 300, True)[0] is None
    sft.train.early_stopping = None
    assert early_stopping(sft, 300, True)[0] is None


def _plan(tmp_path, raw):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(main, ["plan", str(path)])
    return result, result.output + (result.stderr if hasattr(result, "stderr") else "")


def test_plan_refuses_an_early_stopping_metric_the_stage_does_not_log(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["stages"][1]["train"].update(max_steps=-1, early_stopping={"metric": "eval_rewards/acc"})
    result, out = _plan(tmp_path, raw)
    assert result.exit_code == 2, out
    assert "stages[1].train.early_stopping.metric" in out and "logs no held-out 'eval_rewards/acc'" in out
    assert "eval_rewards/accuracies" in out and f"{tmp_path / 'r.yaml'} line " in out


def test_plan_shows_the_data_size_guidance(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["adapter"]["r"] = 32
    raw["stages"][0]["train"] = dict(FAST_TRAIN, max_steps=-1, epochs=3, learning_rate=1e-3, early_stopping=None)
    result, out = _plan(tmp_path, raw)
    assert result.exit_code == 0, out
    assert "# note: adapter.r 32 with at most" in out and "the guidance is r 8" in out
    assert "stages[0] (sft): 3 epochs on" in out and "without early stopping" in out
    assert "stages[0] (sft): learning_rate 0.001 is above 0.0005" in out
    raw["adapter"]["r"] = 8
    raw["stages"][0]["train"] = dict(FAST_TRAIN, max_steps=-1, epochs=1, learning_rate=2e-4)
    raw["stages"][1]["train"]["learning_rate"] = 5e-6
    result, out = _plan(tmp_path, raw)
    assert result.exit_code == 0 and "# note: " not in out, out  # a recipe within the guidance: no note
