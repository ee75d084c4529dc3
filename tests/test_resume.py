"""Run folder contract: atomic stages, skip what is done and unchanged, redo the rest, survive a kill."""

import json
import os

import pytest
from conftest import chain_recipe

import prefopt
from prefopt import recipe_from_dict
from prefopt.stages import STAGES


def _manifest(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def test_rerun_skips_unchanged_and_redoes_changed(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    out = tmp_path / "run"
    first = prefopt.run(recipe_from_dict(raw), output_dir=out)
    sft_bytes = (first.adapters["sft"] / "adapter_model.safetensors").read_bytes()
    dpo_bytes = (first.adapters["dpo"] / "adapter_model.safetensors").read_bytes()

    again = prefopt.run(recipe_from_dict(raw), output_dir=out)
    assert [s.skipped for s in again.stages] == [True, True]
    assert (again.adapters["dpo"] / "adapter_model.safetensors").read_bytes() == dpo_bytes
    assert again.metrics == first.metrics

    # a DPO-only change redoes DPO alone
    changed = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.beta": 0.3}), output_dir=out)
    assert [s.skipped for s in changed.stages] == [True, False]
    assert (changed.adapters["sft"] / "adapter_model.safetensors").read_bytes() == sft_bytes

    # a file change the data step filters out (an exact duplicate of a row) leaves what DPO trains on, and DPO, as
    # they were; the data step's count shows it
    dups = _manifest(out)["stages"][1]["data"]["dropped"].get("exact_duplicate", 0)
    lines = small_data["prefs"].read_text().splitlines()
    small_data["prefs"].write_text("\n".join(lines + [lines[0]]) + "\n")
    dup = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.beta": 0.3}), output_dir=out)
    assert [s.skipped for s in dup.stages] == [True, True]
    assert _manifest(out)["stages"][1]["data"]["dropped"]["exact_duplicate"] == dups + 1

    # new SFT data: SFT is redone, and so is DPO, whose starting adapter changed
    small_data["sft"].write_text(small_data["sft"].read_text().replace("kind", "gentle"))
    redone = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.beta": 0.3}), output_dir=out)
    assert [s.skipped for s in redone.stages] == [False, False]

    fresh = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.beta": 0.3}), output_dir=out, fresh=True)
    assert [s.skipped for s in fresh.stages] == [False, False]


def test_killed_stage_keeps_finished_stages_and_resumes(tmp_path, tiny_model, small_data, monkeypatch):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    out = tmp_path / "run"
    real_dpo = STAGES["dpo"]

    def killed(model, tokenizer, stage, data, out_dir, **kw):
        (out_dir / "adapter").mkdir(parents=True)
        (out_dir / "adapter" / "adapter_config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "dpo", killed)
    with pytest.raises(KeyboardInterrupt):
        prefopt.run(recipe_from_dict(raw), output_dir=out)
    m = _manifest(out)
    assert [s["status"] for s in m["stages"]] == ["done", "interrupted"]
    assert (out / "stages" / "00-sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "stages" / "01-dpo").exists(), "a half-written stage never looks finished"

    monkeypatch.setitem(STAGES, "dpo", real_dpo)
    resumed = prefopt.run(recipe_from_dict(raw), output_dir=out)
    assert [s.skipped for s in resumed.stages] == [True, False]
    assert [s["status"] for s in _manifest(out)["stages"]] == ["done", "done"]
    assert not list((out / "stages").glob(".*")), "no temp folders left behind"


def _dpo_losses(run_dir) -> dict:
    history = json.loads((run_dir / "stages" / "01-dpo" / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _run_until_checkpoint(cmd, out, sig, after: int, env, timeout=300):
    """Start `prefopt run`, wait until DPO has written `after` complete checkpoints, send `sig`; returns the exit
    code and the step of the newest complete checkpoint when the signal was sent."""
    import signal as _signal
    import subprocess
    import sys
    import time

    from prefopt.runs.folder import last_checkpoint

    proc = subprocess.Popen([sys.executable, "-m", "prefopt.cli", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    tmp = out / "stages" / ".01-dpo.tmp"
    t0, seen = time.time(), set()
    while time.time() - t0 < timeout and proc.poll() is None:
        last = last_checkpoint(tmp) if tmp.exists() else None
        if last is not None:
            seen.add(last[1])
        if len(seen) >= after:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    code = proc.wait(timeout=timeout)
    assert len(seen) >= after, f"the run ended before {after} checkpoints: {proc.stderr.read()[-2000:]}"
    assert sig in (_signal.SIGKILL, _signal.SIGTERM)
    return code, max(seen), proc.stderr.read()


@pytest.mark.parametrize("sig_name,after", [("SIGKILL", 1), ("SIGTERM", 3)])
def test_interrupted_preference_stage_resumes_exactly(sig_name, after, tmp_path, tiny_model, small_data):
    """kill -9 (or SIGTERM, what SLURM sends) during DPO after some checkpoints, the same command again: the
    finished SFT stage is untouched, DPO resumes from its last checkpoint, and its per-step losses equal an
    uninterrupted run's (CPU fp32) -- data order, RNG and schedule restored."""
    import signal as _signal

    import yaml

    raw = chain_recipe(tiny_model, small_data, "dpo", quantization="none")
    raw["stages"][1]["train"].update(max_steps=16, checkpoint_every=2, logging_steps=1, batch_size=2)
    reference = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "reference")

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    cmd = ["run", str(path), "--output-dir", str(out)]
    # its own shared cache: the reference run's finished stages must not be reused, the point is to train and kill
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(tmp_path / "run-cache")}
    code, step, err = _run_until_checkpoint(cmd, out, getattr(_signal, sig_name), after, env)
    m = _manifest(out)
    assert m["stages"][0]["status"] == "done"
    sft_bytes = (out / "stages" / "00-sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    if sig_name == "SIGTERM":  # handled: the step in progress ends with a checkpoint, the stage says why it stopped
        assert code == 143, err[-2000:]
        assert m["stages"][1]["status"] == "interrupted" and m["stages"][1]["last_checkpoint_step"] >= step
    else:
        assert code == -9
    # checkpoints hold prefopt's adapter only, not DPOTrainer's "ref" copy
    assert not list((out / "stages" / ".01-dpo.tmp").rglob("ref"))

    import subprocess
    import sys

    again = subprocess.run([sys.executable, "-m", "prefopt.cli", *cmd], capture_output=True, text=True, timeout=600,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    m = _manifest(out)
    k = m["stages"][1]["resumed_from_step"]
    assert k >= step > 0
    assert f"resuming stage dpo from step {k}" in again.stderr
    assert m["stages"][0]["status"] == m["stages"][1]["status"] == "done"
    assert (out / "stages" / "00-sft" / "adapter" / "adapter_model.safetensors").read_bytes() == sft_bytes
    want, got = _dpo_losses(reference.run_dir), _dpo_losses(out)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for s in range(k + 1, 17):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-7), (s, got[s], want[s])
    assert not list((out / "stages").glob(".*")), "the finished stage's checkpoints are gone"


def test_changed_inputs_start_the_stage_over_and_say_why(tmp_path, tiny_model, small_data, capsys):
    from prefopt.runs.folder import STAGE_INPUTS, mark_checkpoint

    raw = chain_recipe(tiny_model, small_data, None, quantization="none")
    out = tmp_path / "run"
    prefopt.run(recipe_from_dict(raw), output_dir=out)
    # a checkpoint of an earlier attempt whose inputs differ
    tmp = out / "stages" / ".00-sft.tmp"
    (tmp / "trainer" / "checkpoint-2").mkdir(parents=True)
    mark_checkpoint(tmp / "trainer" / "checkpoint-2")
    (tmp / STAGE_INPUTS).write_text("not-these-inputs")
    messages = []
    prefopt.run(recipe_from_dict(raw, overrides={"stages.0.train.learning_rate": 1e-3}), output_dir=out,
                echo=messages.append)
    assert any("checkpoints were made with other inputs" in s and "starting it over" in s for s in messages), messages
    assert "resumed_from_step" not in _manifest(out)["stages"][0]


def test_reference_logps_cache_hits_across_beta_and_misses_on_max_length(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo", quantization="none", precompute_ref_log_probs=True)
    first = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "a")
    ref_a = _manifest(first.run_dir)["stages"][1]["ref_logps"]
    assert ref_a["cache"] == "miss" and ref_a["rows"] > 0 and ref_a["seconds"] > 0
    # another run folder, another beta: the SFT stage is reused from the shared store, the log-probs are read
    beta = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.beta": 0.3}), output_dir=tmp_path / "b")
    m = _manifest(beta.run_dir)
    assert m["stages"][0]["reused_from"] and m["stages"][1]["ref_logps"]["cache"] == "hit"
    assert m["stages"][1]["ref_logps"]["seconds"] == 0 and m["stages"][1]["ref_logps"]["rows"] == ref_a["rows"]
    # ... and they are the numbers a computation gives: the same losses as a run with sharing off
    off = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.beta": 0.3, "cache_dir": "off"}),
                      output_dir=tmp_path / "c")
    assert _manifest(off.run_dir)["stages"][1]["ref_logps"]["cache"] == "miss"
    assert _dpo_losses(beta.run_dir) == pytest.approx(_dpo_losses(off.run_dir), rel=1e-6)
    # another max_length changes the log-probs: a miss
    other = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.train.max_length": 80}), output_dir=tmp_path / "d")
    assert _manifest(other.run_dir)["stages"][1]["ref_logps"]["cache"] == "miss"


def test_a_sweep_reuses_the_unchanged_sft_stage_from_another_run_folder(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo", quantization="none")
    first = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "beta-0.1")
    messages = []
    second = prefopt.run(recipe_from_dict(raw, overrides={"stages.1.beta": 0.2, "name": "sweep"}),
                         output_dir=tmp_path / "beta-0.2", echo=messages.append)
    assert [s.skipped for s in second.stages] == [True, False]
    assert any("stage sft: reused from" in s for s in messages), messages
    a = (first.adapters["sft"] / "adapter_model.safetensors").read_bytes()
    assert (second.adapters["sft"] / "adapter_model.safetensors").read_bytes() == a
    m = _manifest(second.run_dir)
    assert (m["stages"][0]["status"] == "done"
            and m["stages"][0]["metrics"] == _manifest(first.run_dir)["stages"][0]["metrics"])
    # a changed SFT stage is trained, not reused
    third = prefopt.run(recipe_from_dict(raw, overrides={"stages.0.train.learning_rate": 1e-3}),
                        output_dir=tmp_path / "lr")
    assert [s.skipped for s in third.stages] == [False, False]
