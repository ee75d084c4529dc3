"""Nothing lost, nothing late (issue 21): a failing run never rewrites a finished run's records; every knowable
error before anything is touched; exit codes a script can trust. The environment is changed as users meet it: no
network, read-only folders, a full disk, killed pipes, signals -- and after each failed attempt every file of a
finished run folder is byte-identical."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import DEMO_DATA, chain_recipe

from prefopt.cli import main

PREFOPT = [sys.executable, "-m", "prefopt.cli"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_identical(folder: Path, before: dict[str, bytes]) -> None:
    after = snapshot(folder)
    assert sorted(after) == sorted(before), (set(after) ^ set(before))
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"rewritten by a failed attempt: {changed}"


def finished_recipe(tiny_model, data) -> dict:
    raw = chain_recipe(tiny_model, data, "dpo", name="finished")
    raw["eval"] = {"mmlu": None, "completions": {"n": 2, "max_new_tokens": 4},
                   "gates": {"max_mmlu_drop": None, "min_reward_accuracy": 0.0}}
    raw["merge"] = {"dtype": "bfloat16"}
    return raw


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    out = {}
    for name, src in (("sft", "sft.jsonl"), ("prefs", "prefs.jsonl")):
        (d / src).write_text("\n".join((DEMO_DATA / src).read_text().splitlines()[:40]) + "\n")
        out[name] = d / src
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, data) -> tuple[Path, Path]:
    """A finished run (SFT -> DPO, evaluation, merge) with a signed review, and its recipe file."""
    root = tmp_path_factory.mktemp("finished")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(finished_recipe(tiny_model, data), sort_keys=False))
    out = root / "run"
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(root / "cache")}
    proc = subprocess.run(PREFOPT + ["run", str(recipe), "--output-dir", str(out)], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(PREFOPT + ["review", str(out), "--reviewer", "ada", "--verdict", "approve"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, recipe


@pytest.fixture()
def copy(finished, tmp_path) -> tuple[Path, Path, dict]:
    """A copy of the finished run folder for one test to attack, and its snapshot."""
    src, recipe = finished
    out = tmp_path / "run"
    shutil.copytree(src, out, symlinks=True)
    return out, recipe, snapshot(out)


def variant(recipe: Path, tmp_path: Path, change) -> Path:
    raw = yaml.safe_load(recipe.read_text())
    change(raw)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_cli(args, tmp_path, *, env=None, **kw):
    e = {**os.environ, "PREFOPT_CACHE_DIR": str(tmp_path / "empty-cache"), **(env or {})}
    for k in [k for k, v in e.items() if v is None]:
        del e[k]
    return subprocess.run(PREFOPT + list(args), capture_output=True, text=True, env=e, **kw)


# ---------------------------------------------------------------------------------------------- no network


def test_unreachable_hub_model_is_refused_before_anything_is_touched(copy, tmp_path):
    out, recipe, before = copy
    bad = variant(recipe, tmp_path, lambda r: r["model"].update(name_or_path="meta-llama/Llama-3.1-8B-Instruct"))
    no_network = {"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"),
                  "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: as unreachable as no network
    proc = run_cli(["run", str(bad), "--output-dir", str(out)], tmp_path, env=no_network)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err and "stage 1/2" not in err, err[-3000:]  # refused in preflight, no model loaded
    assert "meta-llama/Llama-3.1-8B-Instruct" in err and "cannot be reached" in err and "line " in err
    assert "HF_HUB_OFFLINE=1" in err
    assert_identical(out, before)
    # the same with HF_HUB_OFFLINE=1 set
    proc = run_cli(["plan", str(bad)], tmp_path, env={**no_network, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr, proc.stderr[-2000:]

    # the original recipe, with an empty shared store: nothing retrained, the signed review kept
    proc = run_cli(["run", str(recipe), "--output-dir", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage sft: done and unchanged" in proc.stderr and "stage dpo: done and unchanged" in proc.stderr
    log = json.loads((out / "eval" / "eval_log.json").read_text())
    assert [r["reviewer"] for r in log["reviews"]] == ["ada"] and not log["reviews"][0].get("stale")
    assert_identical(out, before)  # a rerun with nothing new writes nothing either


def test_a_cached_model_works_offline_when_the_hub_is_unreachable(tmp_path, tiny_model):
    """A hub id in the local cache: preflight asks the hub once, finds it unreachable and works from the cache
    (no retries of every file)."""
    from prefopt import hub
    from prefopt.preflight import check_hub

    raw = chain_recipe(tiny_model, {"sft": DEMO_DATA / "sft.jsonl", "prefs": DEMO_DATA / "prefs.jsonl"}, None)
    raw["model"]["name_or_path"] = "someone/some-model"
    from prefopt import recipe_from_dict

    rec = recipe_from_dict(raw)
    old = os.environ.pop("HF_HUB_OFFLINE", None)
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, constants.ENDPOINT)
    constants.HF_HUB_OFFLINE, constants.ENDPOINT = False, "http://127.0.0.1:9"
    hub.reset()
    try:
        warnings = check_hub(rec)
        assert warnings and "cannot be reached" in warnings[0] and hub.offline()
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    finally:
        constants.HF_HUB_OFFLINE, constants.ENDPOINT = saved
        hub.reset()
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


# ---------------------------------------------------------------------------------------------- read-only, full disk


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` mounted read-only onto itself (root: a bind mount), or made unwritable (another user)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if not ok:
        pytest.skip("root without mount(2) here: no read-only folder can be made")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder` (root), the full-disk stand-in."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("no tmpfs mount here (needs root); the ENOSPC test below covers a full disk by patching")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_new_folder_is_a_user_error(tmp_path, finished):
    _, recipe = finished
    ro = tmp_path / "ro"
    with read_only(ro):
        proc = run_cli(["run", str(recipe), "--output-dir", str(ro / "new-run")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
    assert "read-only" in proc.stderr and "--output-dir" in proc.stderr
    assert not (ro / "new-run").exists()


def test_read_only_existing_run_folder_is_a_user_error(copy, tmp_path):
    out, recipe, before = copy
    changed = variant(recipe, tmp_path, lambda r: r["stages"][1]["train"].update(learning_rate=5e-4))
    with read_only(out):
        proc = run_cli(["run", str(changed), "--output-dir", str(out)], tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        said = [x for x in proc.stderr.splitlines() if x.startswith("prefopt:")]  # (libraries print warnings too)
        assert "Traceback" not in proc.stderr and len(said) == 1, proc.stderr
        assert "read-only" in proc.stderr
    assert_identical(out, before)


def test_an_unexpected_error_in_a_read_only_run_folder_logs_elsewhere(copy, tmp_path, monkeypatch, capsys):
    """The error handler never fails on the same folder: the traceback goes to the user's log folder."""
    from prefopt import cli

    out, _, before = copy
    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "cache"))
    with read_only(out):
        try:
            raise ZeroDivisionError("a bug")
        except ZeroDivisionError as e:
            with pytest.raises(SystemExit) as exit_:
                cli._bug(e, out)  # the CLI's bug handler itself: this test is about that internal
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError: a bug" in err and "Traceback" not in err
    log = Path(err.rsplit("full traceback in ", 1)[1].strip())
    assert log.is_file() and log.parent == tmp_path / "cache" / "logs" and "Traceback" in log.read_text()
    assert_identical(out, before)


def test_a_bug_before_any_work_logs_outside_the_finished_folder(copy, tmp_path, monkeypatch):
    """An unexpected error while the model loads: exit 1, the traceback in the user's log folder, and the finished
    run folder byte-identical (no logs/ written into it)."""
    import prefopt.models

    out, recipe, before = copy
    changed = variant(recipe, tmp_path, lambda r: r["stages"][1]["train"].update(learning_rate=5e-4))

    def broken(*a, **kw):
        raise ZeroDivisionError("a bug while loading")

    monkeypatch.setattr(prefopt.models, "load_base_model", broken)
    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["run", str(changed), "--output-dir", str(out)])
    assert result.exit_code == 1 and "ZeroDivisionError: a bug while loading" in result.output, result.output[-2000:]
    assert str(tmp_path / "cache" / "logs") in result.output
    assert_identical(out, before)


def test_a_disk_too_small_is_refused_before_training(tmp_path, finished):
    _, recipe = finished
    disk = tmp_path / "disk"
    with small_disk(disk, "200k"):
        proc = run_cli(["run", str(recipe), "--output-dir", str(disk / "run")], tmp_path)
        assert not (disk / "run").exists()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "GiB free on its disk" in proc.stderr and "Traceback" not in proc.stderr


def test_a_full_disk_while_writing_is_a_user_error_and_loses_nothing(copy, tmp_path, monkeypatch):
    """ENOSPC when the run writes its records (a patched write: the disk fills after preflight looked)."""
    import prefopt.runs.folder as rf

    out, recipe, before = copy
    changed = variant(recipe, tmp_path, lambda r: r["stages"][1]["train"].update(learning_rate=5e-4))
    real = rf.write_atomic

    def full(path, text):
        if Path(path).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(rf, "write_atomic", full)
    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["run", str(changed), "--output-dir", str(out)])
    assert result.exit_code == 2, result.output[-3000:]
    assert "disk is full" in result.output and "Traceback" not in result.output
    assert_identical(out, before)


# ---------------------------------------------------------------------------------------------- failures later on


def test_a_failure_in_a_later_stage_keeps_the_others_records(copy, tmp_path, monkeypatch):
    """SFT retrains (new learning rate) and is committed; DPO then fails: its record turns 'failed', the eval log,
    the signed review and the merge stay as they were."""
    import prefopt
    from prefopt.stages import STAGES

    out, recipe, before = copy
    changed = variant(recipe, tmp_path, lambda r: r["stages"][0]["train"].update(learning_rate=2e-3))

    def broken(*a, **kw):
        raise RuntimeError("the DPO trainer broke")

    monkeypatch.setitem(STAGES, "dpo", broken)
    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="DPO trainer broke"):
        prefopt.run(prefopt.load_recipe(changed), output_dir=out, echo=lambda s: None)
    m = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["done", "failed"]
    assert (out / "stages/00-sft/adapter/adapter_model.safetensors").read_bytes() != \
        before["stages/00-sft/adapter/adapter_model.safetensors"]
    for kept in ("eval/eval_log.json", "merged/merge_report.json", "merged/README.md",
                 "stages/01-dpo/adapter/adapter_model.safetensors"):
        assert (out / kept).read_bytes() == before[kept], kept


def test_a_killed_stage_leaves_later_stages_records_and_the_review(copy, tmp_path):
    """SFT retrains and is killed (SIGKILL) mid-training: run.json says SFT is running, DPO's record, the eval
    log and the signed review are as they were."""
    out, recipe, before = copy
    changed = variant(recipe, tmp_path, lambda r: r["stages"][0]["train"].update(learning_rate=2e-3, max_steps=60,
                                                                                 logging_steps=1))
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(PREFOPT + ["run", str(changed), "--output-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if STEP_LINE.match(line):  # the console's line for a logging step (issue 23)
            break
    proc.kill()
    proc.wait()
    m = json.loads((out / "run.json").read_text())
    old = json.loads(before["run.json"])
    assert m["stages"][0]["status"] == "running" and m["stages"][1] == old["stages"][1]
    for kept in ("eval/eval_log.json", "merged/merge_report.json", "stages/01-dpo/adapter/adapter_model.safetensors",
                 "stages/00-sft/adapter/adapter_model.safetensors"):
        assert (out / kept).read_bytes() == before[kept], kept


# ---------------------------------------------------------------------------------------------- signals and pipes


STEP_LINE = re.compile(r"^  \w+ +step +\d+/\d+  loss ")


def _train_until_logging(changed: Path, out: Path, tmp_path: Path):
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(PREFOPT + ["run", str(changed), "--output-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if STEP_LINE.match(line):  # the console's line for a logging step (issue 23)
            return proc, seen
    raise AssertionError("training never logged: " + "".join(seen[-40:]))


def _long(recipe, tmp_path):
    return variant(recipe, tmp_path, lambda r: r["stages"][0]["train"].update(
        learning_rate=2e-3, max_steps=60, logging_steps=1, checkpoint_every=1000))


@pytest.mark.parametrize("how,code", [("sigint", 130), ("sigterm", 143), ("pipe", 141), ("sigint+pipe", 130)])
def test_signals_and_a_closed_pipe_checkpoint_and_exit_with_their_code(copy, tmp_path, how, code):
    out, recipe, before = copy
    proc, _ = _train_until_logging(_long(recipe, tmp_path), out, tmp_path)
    if "pipe" in how:
        proc.stdout.close()  # `| head` after one line, or tee killed by Ctrl-C
    if how.startswith("sigint"):
        os.kill(proc.pid, signal.SIGINT)
    elif how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)
    rest = "" if "pipe" in how else proc.stdout.read()
    assert proc.wait(timeout=300) == code, rest[-3000:]
    m = json.loads((out / "run.json").read_text())
    sft = m["stages"][0]
    assert sft["status"] == "interrupted" and sft.get("last_checkpoint_step", 0) >= 1, sft
    assert m["stages"][1] == json.loads(before["run.json"])["stages"][1]
    if "pipe" in how:  # the last words went to the run's log (its console output, all of it, since issue 23)
        assert "re-run the same command to resume" in (out / "logs" / "run.log").read_text()
    else:
        assert "re-run the same command to resume" in rest
    if how == "sigterm":  # --fresh over an interrupted stage's checkpoint starts over (it resumed, then crashed)
        proc = run_cli(["run", str(_long(recipe, tmp_path)), "--output-dir", str(out), "--fresh"], tmp_path,
                       env={"PREFOPT_CACHE_DIR": str(tmp_path / "cache")}, timeout=600)
        assert proc.returncode == 0 and "resuming" not in proc.stderr, proc.stderr[-3000:]
        return
    if how != "sigint":
        return
    # and the same command resumes from the checkpoint
    proc = run_cli(["run", str(_long(recipe, tmp_path)), "--output-dir", str(out)], tmp_path,
                   env={"PREFOPT_CACHE_DIR": str(tmp_path / "cache")}, timeout=600)
    assert proc.returncode == 0 and "resuming stage sft from step" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- all at once


FOUR = """\
name: four
model: {{name_or_path: {model}, quantization: none, dtype: float32}}
adapter: {{method: dorra}}
stages:
  - name: sft
    type: sft
    data: {{path: {sft}}}
    train: {{learning_rate: -1, scheduler: cosinee}}
  - name: dpo
    type: dpo
    data: {{path: {missing}}}
    loss_type: sigmoidd
    trainer_kwargs: {{bogus_key: 1}}
tracking: {{wandb: {{mode: disabled}}}}
"""


def test_every_problem_in_one_report(tmp_path, tiny_model):
    path = tmp_path / "four.yaml"
    path.write_text(FOUR.format(model=tiny_model, sft=DEMO_DATA / "sft.jsonl", missing=tmp_path / "missing.jsonl"))
    result = CliRunner().invoke(main, ["plan", str(path), "--set", "adapter.r=abc", "--set", "stages.dpo.beta=0.2"])
    assert result.exit_code == 2, result.output
    out = result.output
    expected = {
        "adapter.method": "did you mean dora?", "adapter.r": "(from --set adapter.r=abc)",
        "stages[0].train.learning_rate": "line 8", "stages[0].train.scheduler": "did you mean cosine?",
        "stages[1].data.path": "file not found", "stages[1].loss_type": "did you mean sigmoid?",
        "stages[1].trainer_kwargs.bogus_key": "line 13",
    }
    lines = [x for x in out.splitlines() if x.strip().startswith("- ")]
    for key, words in expected.items():
        hit = [x for x in lines if x.strip()[2:].startswith(key)]
        assert hit and words in hit[0], (key, words, out)
    assert "9 problems" not in out and "8 problems" not in out and "7 problems" in out, out  # no duplicates
    assert "line 12" in next(x for x in lines if "loss_type" in x)


def test_a_stage_by_name_in_set(tmp_path, tiny_model, small_data):
    from prefopt import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(chain_recipe(tiny_model, small_data, "dpo")))
    assert load_recipe(path, ["stages.dpo.beta=0.3"]).stages[1].beta == 0.3
    assert load_recipe(path, ["stages.1.beta=0.4"]).stages[1].beta == 0.4
    result = CliRunner().invoke(main, ["plan", str(path), "--set", "stages.dpoo.beta=0.2"])
    assert result.exit_code == 2 and "did you mean dpo?" in result.output and "index 0-1" in result.output
    # a bad --set and the recipe's other problems in one report
    result = CliRunner().invoke(main, ["plan", str(path), "--set", "stages.nope.beta=1", "--set", "stages.1.beta=xyz",
                                       "--set", "stages.sft.train.scheduler=cosinee"])
    assert result.exit_code == 2 and "3 problems" in result.output, result.output
    assert "has no item 'nope'" in result.output and "(from --set stages.1.beta=xyz)" in result.output
    assert "did you mean cosine?" in result.output


# --------------------------------------------------------------------------------------------- exit codes, gates, merge


def test_plan_exits_2_when_a_stage_does_not_fit(tmp_path, tiny_model, small_data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(chain_recipe(tiny_model, small_data, "dpo")))
    small = CliRunner().invoke(main, ["plan", str(path), "--device", "cpu", "--gpu-memory", "100KB"])
    assert small.exit_code == 2 and "does not fit" in small.output, small.output[-2000:]
    big = CliRunner().invoke(main, ["plan", str(path), "--device", "cpu", "--gpu-memory", "80GB"])
    assert big.exit_code == 0, big.output[-2000:]
    run = CliRunner().invoke(main, ["run", str(path), "--output-dir", str(tmp_path / "o"), "--gpu-memory", "100KB"])
    assert run.exit_code == 2 and "does not fit" in run.output and not (tmp_path / "o").exists()


def test_gates_record_the_limit_as_written_and_the_margin():
    from prefopt.config import GatesSection
    from prefopt.eval.log import check_gates
    from prefopt.runs.folder import gate_line

    gates = check_gates(GatesSection(max_mmlu_drop=25, min_reward_accuracy=0.6, min_reward_margin=0.1),
                        mmlu={"delta_points": -30.0}, last_preference="dpo", last_stage="dpo",
                        heldout={"dpo": {"reward_accuracy": 1.0, "reward_margin": 0.00024}})
    by = {g["name"]: g for g in gates}
    assert by["max_mmlu_drop"]["threshold"] == 25 and by["max_mmlu_drop"]["value"] == 30.0
    assert by["max_mmlu_drop"]["limit"] == "drop <= 25 points" and by["max_mmlu_drop"]["verdict"] == "fail"
    assert by["min_reward_accuracy"]["verdict"] == "pass"  # the model that did not move: accuracy 1.00 by luck
    assert by["min_reward_margin"]["verdict"] == "fail" and by["min_reward_margin"]["value"] == 0.00024
    line = gate_line([g for g in gates if g["verdict"] == "fail"])
    assert "needs drop <= 25 points" in line and "needs >= 0.1" in line


def test_the_shipped_recipes_gate_on_the_margin():
    root = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("demo", "demo_kto", "sft_then_dpo", "sft_then_kto", "sft_then_orpo", "sft_then_simpo"):
        raw = yaml.safe_load((root / f"{name}.yaml").read_text())
        assert raw["eval"]["gates"].get("min_reward_margin"), name


def test_merge_of_a_current_merge_says_so_and_exits_0(copy, tmp_path):
    out, _, before = copy
    result = CliRunner().invoke(main, ["merge", str(out)], env={"PREFOPT_CACHE_DIR": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output[-2000:]
    assert "is current" in result.output
    assert_identical(out, before)
    import prefopt

    with pytest.raises(prefopt.PrefoptError, match=r"overwrite=True"):  # the API's terms, not --overwrite
        prefopt.merge(out, out_dtype="float32", echo=lambda s: None)
    redone = CliRunner().invoke(main, ["merge", str(out), "--overwrite"])
    assert redone.exit_code == 0, redone.output[-2000:]
    assert "merge PASSED" in redone.output


def test_a_review_of_an_earlier_model_is_kept_and_marked_stale(copy, tmp_path):
    out, recipe, _ = copy
    changed = variant(recipe, tmp_path, lambda r: r["stages"][1]["train"].update(learning_rate=5e-4))
    proc = run_cli(["run", str(changed), "--output-dir", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "eval" / "eval_log.json").read_text())
    assert [(r["reviewer"], r.get("stale")) for r in log["reviews"]] == [("ada", True)]
    assert "stale" in (out / "report.html").read_text()
