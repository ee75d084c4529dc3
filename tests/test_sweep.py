"""`prefopt sweep`: a grid of recipe values, one ordinary run folder per point, shared stages trained once through the
store, resumable after a kill, a failed point reported while the others go on, every bad input refused before any
point starts, and the comparison table (console, sweep.csv, sweep.html, W&B) with the best point marked."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import DEMO_DATA, chain_recipe

import prefopt
from prefopt.cli import main
from prefopt.runs.folder import last_checkpoint
from prefopt.stages import STAGES

GRID = ["--grid", "stages.dpo.beta=0.05,0.1,0.3", "--grid", "adapter.r=4,8"]


def _write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; a link by its target (wandb links each run's logs/debug-core.log to its service's own log
    in ~/.cache/wandb, which the service appends to after a kill: not the run folder's content)."""
    return {str(p.relative_to(folder)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def _sweep_recipe(tiny_model, small_data) -> dict:
    """SFT -> DPO on the tiny model, evaluated (MMLU on the synthetic set, a gate), DPO long enough to be killed."""
    raw = chain_recipe(tiny_model, small_data, "dpo", name="sw")
    raw["stages"][1]["train"].update(max_steps=8, checkpoint_every=2, batch_size=2)
    raw["eval"] = {"mmlu": {"path": str(DEMO_DATA / "mmlu_synthetic"), "num_fewshot": 0, "limit": 1},
                   "completions": {"n": 0}, "gates": {"max_mmlu_drop": None, "min_reward_accuracy": 0.0}}
    return raw


def _kill_in_point(cmd, point: Path, env, timeout=600):
    """Start `prefopt sweep`, wait until `point`'s DPO stage has a complete checkpoint, kill -9 it."""
    proc = subprocess.Popen([sys.executable, "-m", "prefopt.cli", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    tmp = point / "stages" / ".01-dpo.tmp"
    t0 = time.time()
    killed = False
    while time.time() - t0 < timeout and proc.poll() is None:
        if tmp.exists() and last_checkpoint(tmp) is not None:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=timeout)
    err = proc.stderr.read()
    assert killed, f"the sweep ended before {point.name}'s DPO made a checkpoint: {err[-3000:]}"
    return err


def test_sweep_trains_shared_stages_once_and_a_rerun_after_a_kill_trains_only_the_rest(tmp_path, tiny_model,
                                                                                       small_data):
    """3 betas x 2 ranks: 6 points, 2 SFT trainings (one per rank), 4 reuses; killed (kill -9) inside point 4's
    DPO stage, the same command again skips points 1-3 (their folders byte-identical), resumes point 4's DPO from its
    checkpoint, trains no SFT, and finishes; the table marks the best point by the selected metric."""
    recipe = _write(tmp_path, _sweep_recipe(tiny_model, small_data))
    root = tmp_path / "sweep"
    cmd = ["sweep", str(recipe), *GRID, "--select", "eval/rewards/accuracies:max", "--output-dir", str(root)]
    env = dict(os.environ)
    _kill_in_point(cmd, root / "04-beta=0.1_r=8", env)
    state = json.loads((root / "sweep.json").read_text())
    assert [state["points"][f]["status"] for f in sorted(state["points"])] == ["done", "done", "done", "running"]
    before = {f: _tree(root / f) for f in ("01-beta=0.05_r=4", "02-beta=0.05_r=8", "03-beta=0.1_r=4")}

    again = subprocess.run([sys.executable, "-m", "prefopt.cli", *cmd], capture_output=True, text=True, timeout=900,
                           env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    for f, files in before.items():
        assert f"{f} (stages.dpo.beta=" in again.stderr and f"{f}" in again.stderr
        assert _tree(root / f) == files, f"{f}: a finished point was touched"
    assert again.stderr.count("done earlier, skipped") == 3
    assert "resuming stage dpo from step" in again.stderr
    assert "stage 1/2 sft (sft)" not in again.stderr, "the rerun trained an SFT stage"
    assert again.stderr.count("stage 2/2 dpo (dpo)") == 3  # points 4 (resumed), 5 and 6

    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert [r["point"] for r in rows] == ["01-beta=0.05_r=4", "02-beta=0.05_r=8", "03-beta=0.1_r=4",
                                          "04-beta=0.1_r=8", "05-beta=0.3_r=4", "06-beta=0.3_r=8"]
    assert all(r["status"] == "done" for r in rows), [(r["point"], r["status"], r["error"]) for r in rows]
    assert [r["stages.dpo.beta"] for r in rows] == ["0.05", "0.05", "0.1", "0.1", "0.3", "0.3"]
    trained_sft = [r["point"] for r in rows if "sft" in r["trained"].split()]
    reused_sft = [r["point"] for r in rows if "sft" in r["reused"].split()]
    assert trained_sft == ["01-beta=0.05_r=4", "02-beta=0.05_r=8"] and len(reused_sft) == 4
    assert all("dpo" in r["trained"].split() for r in rows)
    point4 = json.loads((root / "04-beta=0.1_r=8" / "run.json").read_text())
    assert point4["stages"][1]["resumed_from_step"] >= 2
    assert point4["sweep"]["overrides"] == {"stages.dpo.beta": 0.1, "adapter.r": 8}
    assert all(r["mmlu_delta"] != "" and r["gates"] == "pass" for r in rows)
    # the best point: the highest held-out reward accuracy of the DPO stage, marked once, everywhere
    acc = {r["point"]: float(r["dpo/eval/rewards/accuracies"]) for r in rows}
    best = [r["point"] for r in rows if r["best"] == "yes"]
    assert len(best) == 1 and acc[best[0]] == max(acc.values())
    html = (root / "sweep.html").read_text()
    assert html.count("class='best'") == 1 and best[0] in html
    assert "stages trained 8, reused from the shared store 4" in html
    # each point is an ordinary run folder: its recipe holds its values, `prefopt status` reads it
    point6 = yaml.safe_load((root / "06-beta=0.3_r=8" / "recipe.yaml").read_text())
    assert point6["stages"][1]["beta"] == 0.3 and point6["adapter"]["r"] == 8 and point6["sweep"] is None
    assert prefopt.status(root / "06-beta=0.3_r=8").done

    # the Python API: everything finished, so nothing runs; the same table comes back
    lines = []
    result = prefopt.sweep(recipe, grid={"stages.dpo.beta": [0.05, 0.1, 0.3], "adapter.r": [4, 8]},
                           select="eval/rewards/accuracies:max", output_dir=root, echo=lines.append)
    assert sum("done earlier, skipped" in x for x in lines) == 6
    assert result.best["point"] == best[0] and len(result.rows) == 6
    assert "*" in result.text().splitlines()[1 + [r["point"] for r in result.rows].index(best[0])]

    # a reused stage carries the trained one's diagnostics, and the same adapter hashes the same (PEFT writes
    # target_modules in hash order, which differs between processes: prefopt writes them sorted)
    sft_of = {f: json.loads((root / f / "run.json").read_text())["stages"][0]
              for f in ("01-beta=0.05_r=4", "03-beta=0.1_r=4", "05-beta=0.3_r=4")}
    assert all(isinstance(st["diagnostics"], list) for st in sft_of.values()), sft_of
    config = json.loads((root / "05-beta=0.3_r=4" / "stages" / "00-sft" / "adapter" / "adapter_config.json")
                        .read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    assert len({st["lineage"]["adapter_hash"] for st in sft_of.values()}) == 1

    # the same sweep with another fixed value: the finished points are not replaced in place
    before = _tree(root)
    res = _cli([*cmd, "--set", "stages.dpo.train.learning_rate=1e-5"], tmp_path)
    assert res.exit_code == 2 and "finished earlier with another recipe" in res.output, res.output
    assert res.output.count("finished earlier with another recipe") == 6
    assert _tree(root) == before


def test_a_failed_point_is_reported_while_the_others_go_on_in_one_wandb_group(tmp_path, tiny_model, small_data,
                                                                             monkeypatch):
    """Three SFT points, the second fails on a bug: the first and third finish, the table says why the second
    failed, result.check() raises (exit 1: a bug); every stage run and the sweep's table run share one W&B group."""
    raw = chain_recipe(tiny_model, small_data, None, name="one", wandb="offline")
    recipe = _write(tmp_path, raw)
    real = STAGES["sft"]

    def broken_for_one_rate(model, tokenizer, stage, *a, **k):
        if stage.train.learning_rate == 2e-3:
            raise RuntimeError("boom in one point")
        return real(model, tokenizer, stage, *a, **k)

    monkeypatch.setitem(STAGES, "sft", broken_for_one_rate)
    root = tmp_path / "sweep"
    result = prefopt.sweep(recipe, grid=["stages.sft.train.learning_rate=1e-3,2e-3,3e-3"], output_dir=root,
                           quiet=True)
    assert [r["status"] for r in result.rows] == ["done", "failed", "done"]
    assert "boom in one point" in result.rows[1]["error"] and "traceback in" in result.rows[1]["error"]
    with pytest.raises(prefopt.PrefoptError, match="1 of 3 points failed") as e:
        result.check()
    assert e.value.exit_code == 1
    assert result.best is not None and result.best["point"] != result.rows[1]["point"]
    # the failed point has no value of the selected metric (not its SFT's eval/loss from an earlier stage)
    assert result.rows[1]["selected"] is None and result.rows[0]["selected"] is not None

    from test_tracking import _runs

    group = json.loads((root / "sweep.json").read_text())["group"].encode()
    runs = _runs(root / "01-learning_rate=0.001", wait_for=group) + _runs(root, wait_for=b"sweep")
    assert len(runs) == 2 and all(group in blob for blob, _ in runs)
    (stage_run, _), (table_run, _) = runs
    assert b"one-p01/sft" in stage_run and b"sweep/best" in table_run and b"sweep/best" not in stage_run

    # a rerun retries the failed point only (fixed now), and the others are skipped
    monkeypatch.setitem(STAGES, "sft", real)
    lines = []
    again = prefopt.sweep(recipe, grid=["stages.sft.train.learning_rate=1e-3,2e-3,3e-3"], output_dir=root,
                          echo=lines.append)
    assert [r["status"] for r in again.rows] == ["done"] * 3
    assert sum("done earlier, skipped" in x for x in lines) == 2


def _cli(args, tmp_path):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.parametrize("args,needle", [
    (["--grid", "adapter.rr=8,16"], "adapter.rr: unknown key; did you mean r? (from --grid adapter.rr=8,16)"),
    (["--grid", "adapter.r=8,abc"], "adapter.r: Input should be a valid integer"),
    (["--grid", "stages.7.beta=0.1"], "'stages' has no item 7"),
    ([], "the grid is empty"),
    (["--grid", "adapter.r=8,8"], "adapter.r: 8 given more than once"),
    (["--grid", "name=a,b"], "--grid name: the sweep sets this itself"),
    (["--grid", "adapter.r=4,8", "--select", "eval/nonsense"], "--select eval/nonsense: no point logs eval/nonsense"),
    (["--grid", "adapter.r=4,8", "--grid", "seed=1,2,3", "--max-points", "4"],
     "the grid has 6 points, more than the cap of 4"),
    (["--grid", "adapter.r=4,8", "--set", "stages.sft.train.early_stopping={metric: rewards/accuracies}"],
     "rewards/accuracies"),
    # review findings: one field under two names, a grid key also fixed, numbers YAML reads as text, the mode
    (["--grid", "stages.1.beta=0.1,0.2", "--grid", "stages.dpo.beta=0.3"],
     "--grid stages.1.beta and --grid stages.dpo.beta: both name stages[1].beta"),
    (["--grid", "adapter=[{r: 4}]", "--grid", "adapter.r=8"], "adapter.r is inside adapter"),
    (["--grid", "adapter.r=4,8", "--set", "adapter.r=16"], "--grid adapter.r and --set adapter.r: both name adapter.r"),
    (["--grid", "stages.sft.train.learning_rate=2e-3,0.002"], "0.002 given more than once"),
    (["--grid", "adapter.r=4,8", "--select", "eval/loss:maximum"], "the mode after ':' must be min or max"),
])
def test_bad_sweeps_are_refused_before_any_point_starts(tmp_path, tiny_model, small_data, args, needle):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    recipe = _write(tmp_path, raw)
    root = tmp_path / "sweep"
    res = _cli(["sweep", str(recipe), *args, "--output-dir", str(root)], tmp_path)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert "in the sweep:" in res.output
    assert not root.exists(), "nothing is written before every check passed"


def test_the_python_api_reads_grid_values_as_the_command_line_does(tmp_path, tiny_model, small_data):
    """A dict's values: a list, or the command line's text "V1,V2" (not iterated letter by letter); a single
    value is refused with the key named."""
    recipe = _write(tmp_path, chain_recipe(tiny_model, small_data, None))
    with pytest.raises(prefopt.RecipeError, match="grid adapter.r: expected a list of values"):
        prefopt.sweep(recipe, grid={"adapter.r": 8}, output_dir=tmp_path / "s", quiet=True)
    with pytest.raises(prefopt.RecipeError) as e:
        prefopt.sweep(recipe, grid={"adapter.r": "16,16"}, output_dir=tmp_path / "s", quiet=True)
    assert e.value.problems == ["grid adapter.r: 16 given more than once; give each value once"]
    with pytest.raises(prefopt.RecipeError, match="the mode after ':' must be min or max"):
        prefopt.sweep(recipe, grid="adapter.r=4,8", select="eval/loss:low", output_dir=tmp_path / "s", quiet=True)
    assert not (tmp_path / "s").exists()


def test_a_sweep_never_writes_into_a_folder_it_did_not_make(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, None)
    recipe = _write(tmp_path, raw)
    root = tmp_path / "sweep"
    mine = root / "02-r=8"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (root / "sweep.json").write_text(json.dumps({"recipe_name": "chain", "made": [], "points": {}}))
    res = _cli(["sweep", str(recipe), "--grid", "adapter.r=4,8", "--output-dir", str(root)], tmp_path)
    assert res.exit_code == 2 and "02-r=8: exists and was not made by this sweep" in res.output, res.output
    assert (mine / "notes.txt").read_text() == "mine" and not (root / "01-r=4").exists()
    other = tmp_path / "not-a-sweep"
    other.mkdir()
    (other / "data.csv").write_text("x")
    res = _cli(["sweep", str(recipe), "--grid", "adapter.r=4,8", "--output-dir", str(other)], tmp_path)
    assert res.exit_code == 2 and "not a prefopt sweep folder" in res.output, res.output
    assert sorted(p.name for p in other.iterdir()) == ["data.csv"]


def test_a_sweep_file_and_the_recipes_sweep_section(tmp_path, tiny_model, small_data):
    """The grid from a sweep file (recipe path relative to it) or the recipe's sweep: section, checked the same way;
    `prefopt run` of a recipe with a sweep: section runs it once, as written."""
    raw = chain_recipe(tiny_model, small_data, None)
    raw["sweep"] = {"grid": {"adapter.r": [4, 8], "adapter.rr": [1]}}
    recipe = _write(tmp_path, raw)
    res = _cli(["sweep", str(recipe), "--output-dir", str(tmp_path / "s1")], tmp_path)
    assert res.exit_code == 2 and "adapter.rr: unknown key" in res.output, res.output
    (tmp_path / "sweeps").mkdir()
    sweep_file = tmp_path / "sweeps" / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"recipe": "../r.yaml", "grid": {"adapter.alpha": [8, 16]},
                                          "select": "sft/nonsense", "sets": {}}))
    res = _cli(["sweep", str(sweep_file), "--output-dir", str(tmp_path / "s2")], tmp_path)
    assert res.exit_code == 2 and "sets: unknown key of a sweep file" in res.output, res.output
    del raw["sweep"]["grid"]["adapter.rr"]
    recipe = _write(tmp_path, raw)
    plan = prefopt.plan(recipe)
    assert plan.text  # the sweep section does not stop a plan (or a run) of the recipe as written
