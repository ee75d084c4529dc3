"""Run folder integrity: a killed merge is redone, --fresh deletes only prefopt's files, another recipe's run is
refused, dropped stages leave stages/, temp folders are cleared at start-up."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import chain_recipe
from safetensors.torch import load_file

import prefopt
from prefopt import PrefoptError, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "prefopt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


KILL_IN_MERGE = textwrap.dedent('''
    import os, signal, sys
    import prefopt, prefopt.merging.stream as merging, prefopt.steps.merge as merge_step
    point = sys.argv[3]
    if point == "temp-written":
        real = merging.stream_merge
        def killed(adapter, base_dir, out_dir, **kw):
            real(adapter, base_dir, out_dir, **kw)   # the temp folder is full: now die as kill -9 would
            os.kill(os.getpid(), signal.SIGKILL)
        merging.stream_merge = killed
    else:  # merged/ swapped in, run.json not yet updated
        real = merge_step.merge_adapter  # (as the run's merge step calls it)
        def killed(*a, **kw):
            real(*a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        merge_step.merge_adapter = killed
    recipe = prefopt.load_recipe(sys.argv[1], overrides=sys.argv[4:])
    prefopt.run(recipe, output_dir=sys.argv[2])
''')


@pytest.mark.parametrize("point", ["temp-written", "swapped-in"])
def test_killed_merge_is_redone_and_equals_a_fresh_merge(tmp_path, tiny_model, small_data, point):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["merge"] = {"dtype": "bfloat16"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    prefopt.run(prefopt.load_recipe(path), output_dir=out)
    first = tensors(out / "merged")
    assert json.loads((out / "run.json").read_text())["merge"]["status"] == "done"
    records = (out / "run.json").read_bytes()

    # the merge's inputs change (its dtype) and the merge is killed (-9) after writing its temp folder
    proc = subprocess.run([sys.executable, "-c", KILL_IN_MERGE, str(path), str(out), point, "merge.dtype=float32"],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if point == "temp-written":
        assert list(out.glob(".merged.tmp-*")), "the kill left its temp folder"
    # a killed merge committed nothing: the records still describe the finished run (issue 21: records change only
    # when new work is done; a merge that did not finish is not)
    assert (out / "run.json").read_bytes() == records

    lines = []
    result = prefopt.run(prefopt.load_recipe(path, ["merge.dtype=float32"]), output_dir=out, echo=lines.append)
    assert not any("merge: done and unchanged" in s for s in lines), lines
    assert not list(out.glob(".merged.tmp-*")), "temp folders are cleared when a run starts"
    assert result.merge_report["out_dtype"] == "float32"
    redone = tensors(out / "merged")
    assert all(t.dtype == torch.float32 for k, t in redone.items() if k.endswith("proj.weight"))
    fresh = prefopt.merge(out, tmp_path / "fresh", out_dtype="float32", echo=lambda s: None)
    assert fresh["verification"]["passed"]
    again = tensors(tmp_path / "fresh")
    assert redone.keys() == again.keys() and redone.keys() == first.keys()
    for k in redone:
        assert torch.equal(redone[k], again[k]), k
    # and now it is done: the same command skips it
    lines = []
    prefopt.run(prefopt.load_recipe(path, ["merge.dtype=float32"]), output_dir=out, echo=lines.append)
    assert any("merge: done and unchanged, skipped" in s for s in lines)

    if point != "temp-written":
        return
    # a merge report that does not agree with run.json (e.g. merged/ replaced by hand) is not trusted
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    report["inputs_hash"] = "something-else"
    (out / "merged" / "merge_report.json").write_text(json.dumps(report))
    lines = []
    prefopt.run(prefopt.load_recipe(path, ["merge.dtype=float32"]), output_dir=out, echo=lines.append)
    assert not any("merge: done and unchanged" in s for s in lines)

    # the recipe loses its DPO stage: run.json forgets it, its folder leaves stages/
    raw["stages"] = raw["stages"][:1]
    raw.pop("merge")
    path.write_text(yaml.safe_dump(raw))
    result = prefopt.run(prefopt.load_recipe(path), output_dir=out)
    m = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in m["stages"]] == ["sft"] and [s.skipped for s in result.stages] == [True]
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["00-sft"]
    assert (out / "dropped" / "01-dpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_fresh_refuses_a_folder_that_is_not_a_run_folder(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, None)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "notes" / "a.txt").write_text("more")
    for extra in (["--fresh"], []):
        proc = cli("run", str(path), "--output-dir", str(out), *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "not a prefopt run folder" in proc.stderr
        assert (out / "thesis.tex").read_text() == "years of work" and (out / "notes" / "a.txt").is_file()
        assert sorted(p.name for p in out.iterdir()) == ["notes", "thesis.tex"], "nothing written, nothing deleted"


def test_fresh_removes_only_what_prefopt_wrote(tmp_path):
    from prefopt.runs import folder as runfolder

    run = tmp_path / "run"
    (run / "stages" / "00-sft" / "adapter").mkdir(parents=True)
    (run / "merged").mkdir()
    (run / ".merged.tmp-123").mkdir()
    (run / "run.json").write_text(json.dumps({"run_id": "x", "recipe_name": "r", "stages": []}))
    (run / "recipe.yaml").write_text("name: r\n")
    (run / "README-mine.txt").write_text("keep me")
    runfolder.check_output_dir(run, recipe_name="other", stages=[("sft", "sft")], fresh=True)
    runfolder.clear_for_fresh(run)
    assert sorted(p.name for p in run.iterdir()) == ["README-mine.txt"]


def test_another_recipes_run_folder_is_refused(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run_id": "abc", "recipe_name": "other", "stages": [
        {"name": "sft", "type": "sft", "status": "done"}]}))
    # from Python the message names prefopt.run's keyword arguments (issue 21), not the CLI's flags
    with pytest.raises(PrefoptError, match=r"another recipe's run \(recipe 'other'.*fresh=True.*output_dir=<dir>"):
        prefopt.run(recipe_from_dict(raw), output_dir=out)
    # same name, but a stage list that no longer matches
    (out / "run.json").write_text(json.dumps({"run_id": "abc", "recipe_name": "chain", "stages": [
        {"name": "sft", "type": "dpo", "status": "done"}]}))
    with pytest.raises(PrefoptError, match="stage 'sft' was dpo, now sft"):
        prefopt.run(recipe_from_dict(raw), output_dir=out)
    (out / "run.json").write_text(json.dumps({"run_id": "abc", "recipe_name": "chain", "stages": [
        {"name": "pretrain", "type": "sft", "status": "done"}]}))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = cli("run", str(path), "--output-dir", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--fresh" in proc.stderr and "--output-dir" in proc.stderr and "stages pretrain" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.json"], "nothing written"


def test_temp_folders_are_cleared_when_a_run_starts(tmp_path):
    from prefopt.runs import folder as runfolder

    run = tmp_path / "run"
    (run / "stages" / ".01-dpo.tmp" / "adapter").mkdir(parents=True)
    (run / "stages" / ".00-sft.old").mkdir()
    (run / "stages" / "00-sft").mkdir()
    (run / ".merged.tmp-4242").mkdir()
    (run / ".run.json.tmp-99").write_text("{")
    removed = runfolder.clean_temp(run)
    assert len(removed) == 4
    assert sorted(p.name for p in run.rglob("*")) == ["00-sft", "stages"]


def test_names_alone_do_not_make_a_run_folder(tmp_path):
    """A user's own wandb/ or logs/ (prefopt writes such names too) and hidden *.tmp files are not prefopt's:
    --fresh refuses the folder and deletes nothing."""
    from prefopt.errors import PrefoptError
    from prefopt.runs import folder as runfolder

    out = tmp_path / "mine"
    (out / "wandb").mkdir(parents=True)
    (out / "wandb" / "run.log").write_text("mine")
    (out / ".env.tmp").write_text("SECRET=1")
    assert not runfolder.is_run_folder(out)
    with pytest.raises(PrefoptError):
        runfolder.check_output_dir(out, recipe_name="r", stages=[("sft", "sft")], fresh=True)
    assert (out / "wandb" / "run.log").is_file() and (out / ".env.tmp").is_file()
    killed = tmp_path / "killed"  # a run killed before its first manifest
    (killed / "stages").mkdir(parents=True)
    (killed / ".run.json.tmp-77").write_text("{")
    assert runfolder.is_run_folder(killed)


def test_inputs_do_not_depend_on_where_the_project_lies(tmp_path):
    """Stage inputs hash local data by content and a local model by what its folder holds, not by path: a moved
    or re-cloned project keeps its finished stages."""
    import shutil

    from prefopt.runs import folder as runfolder

    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "model").mkdir(parents=True)
        (root / "model" / "config.json").write_text('{"hidden_size": 64}')
        (root / "model" / "model.safetensors").write_bytes(b"x" * 100)
    assert runfolder.model_identity({"name_or_path": str(a / "model")}) == \
        runfolder.model_identity({"name_or_path": str(b / "model")})
    (b / "model" / "config.json").write_text('{"hidden_size": 96}')
    assert runfolder.model_identity({"name_or_path": str(a / "model")}) != \
        runfolder.model_identity({"name_or_path": str(b / "model")})
    assert runfolder.model_identity({"name_or_path": "org/hub-model"}) == {"name_or_path": "org/hub-model"}
    shutil.copy(__file__, a / "d.jsonl")
    st = {"name": "sft", "data": {"path": str(a / "d.jsonl"), "eval_fraction": 0.1}}
    assert runfolder.stage_identity(st) == {"name": "sft", "data": {"eval_fraction": 0.1}}
    assert runfolder.stage_identity({"name": "x", "data": {"path": "org/dataset"}})["data"] == {"path": "org/dataset"}
