"""Run folder contract: atomic stages, skip what is done and unchanged, redo the rest, survive a kill."""

import json

import pytest

import prefopt
from prefopt import recipe_from_dict
from prefopt.stages import STAGES
from conftest import chain_recipe


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
    assert [s["status"] for s in m["stages"]] == ["done", "failed"]
    assert (out / "stages" / "00-sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "stages" / "01-dpo").exists(), "a half-written stage never looks finished"

    monkeypatch.setitem(STAGES, "dpo", real_dpo)
    resumed = prefopt.run(recipe_from_dict(raw), output_dir=out)
    assert [s.skipped for s in resumed.stages] == [True, False]
    assert [s["status"] for s in _manifest(out)["stages"]] == ["done", "done"]
    assert not list((out / "stages").glob(".*")), "no temp folders left behind"
