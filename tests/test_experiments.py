"""Issue 25's experiment tools: early stopping with the best checkpoint, and the data-size guidance in the plan."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST_TRAIN, chain_recipe
from safetensors.torch import load_file

import prefopt
from prefopt import recipe_from_dict
from prefopt.cli import main

LN2 = math.log(2)
ROOT = Path(__file__).resolve().parents[1]


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


def test_early_stopping_survives_a_kill(tmp_path, tiny_model, small_data):
    """kill -9 after the second epoch's checkpoint of an SFT stage that stops after its third evaluation (patience 2,
    best at epoch 1): the rerun resumes, still stops after epoch 3 (not 4: the patience count and the best metric
    come back with the checkpoint), and writes the same best adapter as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from prefopt.runs.folder import last_checkpoint

    raw = chain_recipe(tiny_model, small_data, None, quantization="none")
    _plateau(raw, patience=2)
    raw["stages"][0]["train"]["batch_size"] = 8
    reference = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "reference")
    ref = json.loads((reference.run_dir / "run.json").read_text())["stages"][0]["metrics"]
    per_epoch = ref["early_stopping"]["best_step"]
    assert ref["early_stopping"]["stopped"] == "early" and ref["train"]["steps"] == 3 * per_epoch

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prefopt.cli", "run", str(path), "--output-dir", str(out)]
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(tmp_path / "run-cache")}  # train again, do not reuse
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    tmp, t0 = out / "stages" / ".00-sft.tmp", time.time()
    while time.time() - t0 < 300 and proc.poll() is None:
        last = last_checkpoint(tmp) if tmp.exists() else None
        if last is not None and last[1] >= 2 * per_epoch:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=300) == -9, proc.stderr.read()[-3000:]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming stage sft from step {2 * per_epoch}" in again.stderr
    got = json.loads((out / "run.json").read_text())["stages"][0]["metrics"]
    assert got["early_stopping"]["stopped"] == "early" and got["train"]["steps"] == 3 * per_epoch, got
    assert got["early_stopping"]["best_step"] == per_epoch
    a = load_file(str(reference.run_dir / "stages" / "00-sft" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "stages" / "00-sft" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


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


def test_plan_notes_epochs_without_early_stopping_when_auto_leaves_it_off(tmp_path, tiny_model, small_data):
    """early_stopping: auto (the default) is off for a DPO stage: 3 epochs on few rows is noted there, not on the SFT
    stage where auto turns it on (review finding: the note read `auto` as on)."""
    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["stages"][0]["train"] = dict(FAST_TRAIN, max_steps=-1, epochs=3)
    raw["stages"][1]["train"].update(max_steps=-1, epochs=3)
    result, out = _plan(tmp_path, raw)
    assert result.exit_code == 0, out
    assert "stages[1] (dpo): 3 epochs on" in out and "without early stopping" in out
    assert "stages[0] (sft): 3 epochs on" not in out


# ---------------------------------------------------------------------------------------------- diagnostics


def _diagnostics(result) -> list[list[str]]:
    manifest = json.loads((result.run_dir / "run.json").read_text())
    return [[d["name"] for d in s.get("diagnostics", [])] for s in manifest["stages"]]


def test_a_flat_sft_loss_and_a_reward_accuracy_at_chance_are_diagnosed(tmp_path, tiny_model, small_data):
    """A learning rate of 1e-9: SFT learns nothing, and DPO's held-out accuracy after its epoch is chance."""
    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["stages"][0]["train"] = dict(FAST_TRAIN, learning_rate=1e-9, max_steps=8)
    raw["stages"][1]["train"] = dict(FAST_TRAIN, max_steps=-1, epochs=1, learning_rate=1e-9)
    said = []
    result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run", echo=said.append)
    assert _diagnostics(result) == [["sft_loss_flat"], ["reward_accuracy_at_chance"]]
    assert any(line.startswith("prefopt: diagnostic: stage sft: the training loss did not fall") for line in said)
    html = (result.run_dir / "report.html").read_text()
    assert "Diagnostics" in html
    # the verdict card's summary line says each symptom in words, not as a raw record
    summary = next(line for line in html.split("<li>") if line.startswith("diagnostics: "))
    assert "sft: the training loss did not fall" in summary and "{" not in summary, summary


def test_chosen_log_probs_falling_while_the_margin_rises_is_diagnosed(tmp_path, tiny_model):
    """The shipped demo with plain sigmoid DPO (no SFT term): its held-out chosen answers lose about 3 nats while the
    margin grows -- the symptom the demo's [sigmoid, sft] avoids (test_demo checks the demo itself stays quiet)."""
    import yaml

    raw = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model)
    for st in raw["stages"]:
        st["data"]["path"] = str(ROOT / st["data"]["path"])
    del raw["eval"], raw["merge"], raw["stages"][1]["loss_weights"]
    raw["stages"][1]["loss_type"] = "sigmoid"
    raw["tracking"]["wandb"]["mode"] = "disabled"
    result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run", echo=lambda s: None)
    names = _diagnostics(result)
    assert names == [[], ["chosen_logps_falling"]], names
    ev = result.metrics["dpo"]["eval"]
    assert ev["eval_rewards/chosen"] / 0.1 < -1.0 and ev["eval_rewards/margins"] > 0  # the symptom itself


def test_a_nan_loss_stops_the_stage_with_a_clear_message(tmp_path, tiny_model, small_data):
    """LoRA at a learning rate of 1e30: the loss is NaN within two steps; the stage stops there (exit code 2), it
    does not train on, and run.json records why."""
    from prefopt.errors import TrainingDiverged

    raw = chain_recipe(tiny_model, small_data, None)
    raw["adapter"]["method"] = "lora"
    raw["stages"][0]["train"] = dict(FAST_TRAIN, learning_rate=1e30, max_grad_norm=1e9, max_steps=8)
    with pytest.raises(TrainingDiverged, match=r"training stopped: loss is nan at step \d.*Lower "
                                               r"train.learning_rate \(now 1e\+30\)") as err:
        prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run", echo=lambda s: None)
    assert err.value.exit_code == 2
    entry = json.loads((tmp_path / "run" / "run.json").read_text())["stages"][0]
    assert entry["status"] == "failed" and "loss is nan" in entry["error"]


def test_held_out_loss_rising_and_exploding_gradients_from_their_logs():
    """(The CI-sized model does not overfit in seconds -- 20 epochs at 5e-2 still lower its held-out loss -- so these
    two are fed the logs a run showing them writes.)"""
    from prefopt.advice import diagnose, divergence
    from prefopt.config import SFTStage

    stage = SFTStage(name="sft", data={"path": "x"})
    history = [{"loss": 2.0 - 0.1 * k, "step": 10 * k, "epoch": k / 2} for k in range(1, 9)]
    history += [{"eval_loss": v, "step": 20 * e, "epoch": float(e)} for e, v in ((1, 1.90), (2, 1.70), (3, 1.80),
                                                                                  (4, 1.95))]
    history.sort(key=lambda h: h["step"])
    found = diagnose(stage, history, {})
    assert [d["name"] for d in found] == ["heldout_loss_rising"]
    assert "rose from 1.7000 (step 40) to 1.9500 (step 80)" in found[0]["what"]
    assert divergence([{"grad_norm": g, "step": k} for k, g in enumerate([0.5, 0.4, 0.6, 0.5])]) is None
    why = divergence([{"grad_norm": g, "step": k} for k, g in enumerate([0.5, 0.4, 0.6, 900.0])])
    assert why.startswith("the gradient norm exploded at step 3: 900")
