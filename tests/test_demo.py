"""The shipped demo recipe, end to end, through the CLI as a person runs it (the tiny model is built offline): what
it learns, and what the console shows -- prefopt's lines, one line per logging step, a closing summary -- with every
third-party line in the run folder's logs/run.log."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a person's console must not show (issue 23): third-party warnings, notices and progress bars, raw log dicts
NOISE = re.compile(r"Warning|\[WARNING\]|FutureWarning|kernels-community|Loading weights|\{'\w[^']*': '-?[\d.]")


def _user_env(tmp_path) -> dict:
    """A user's shell: none of the test suite's silencing variables (the run must be quiet on its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_SILENT", "TRL_EXPERIMENTAL_SILENCE", "TOKENIZERS_PARALLELISM", "TQDM_DISABLE",
                        "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    env["PREFOPT_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def _cli(*args, env, cwd=ROOT):
    """The CLI with stdout and stderr in one pipe (not a terminal), as `prefopt ... 2>&1 | tee log` sees it."""
    return subprocess.run([sys.executable, "-m", "prefopt", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "demo"
    env = _user_env(tmp)
    proc = _cli("run", "recipes/demo.yaml", "--output-dir", str(out), "--set",
                f"model.name_or_path={tiny_model}", env=env)
    return out, proc, env


def test_demo_recipe_learns_the_preference(demo):
    out, proc, _ = demo
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "done"]
    acc = manifest["stages"][1]["metrics"]["eval"]["eval_rewards/accuracies"]
    assert acc >= 0.75, f"held-out reward accuracy {acc}"
    assert "held-out reward accuracy" in proc.stdout
    # ... and ends with a verified merge that loads without PEFT
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    assert report["base_mode"] == "dequantized" and report["verification"]["passed"]
    assert manifest["merge"]["status"] == "done"
    assert "merge PASSED" in proc.stdout
    # ... evaluated before the merge, on the shipped synthetic MMLU-layout set, with a report to open
    log = json.loads((out / "eval" / "eval_log.json").read_text())
    assert log["passed"] and log["mmlu"]["tuned"]["n"] == 24 and manifest["eval"]["passed"]
    assert len((out / "eval" / "completions.jsonl").read_text().splitlines()) == 25
    # ... and the training diagnostics have nothing to say about it (issue 25)
    assert all(s["diagnostics"] == [] for s in manifest["stages"]), [s["diagnostics"] for s in manifest["stages"]]
    assert "diagnostic:" not in proc.stdout
    assert (out / "report.html").is_file() and (out / "merged" / "README.md").is_file()


def test_demo_console_is_prefopts_alone_and_ends_with_the_summary(demo):
    out, proc, _ = demo
    text = proc.stdout
    noisy = [line for line in text.splitlines() if NOISE.search(line)]
    assert not noisy, "third-party noise on the console:\n" + "\n".join(noisy[:10])
    assert "\r" not in text, "carriage-return progress in a non-terminal"
    lines = text.splitlines()
    # the header first: recipe, base, adapter, stages, run folder, device
    assert lines[0].startswith("prefopt ") and "recipe demo" in lines[0]
    assert any(line.strip().startswith("device") for line in lines[:10])
    # one fixed-width line per logging step, with the key numbers as numbers
    sft_steps = [line for line in lines if re.match(r"^  sft +step +\d+/72  loss \d+\.\d{4}  lr ", line)]
    # (the demo's DPO is RPO since issue 24: each loss's part beside the total)
    dpo_steps = [line for line in lines if re.match(r"^  dpo +step +\d+/34  loss \d+\.\d{4}  loss/sigmoid \d\.\d{4}  "
                                                    r"loss/sft \d+\.\d{4}  acc \d\.\d\d  margin ", line)]
    assert len(sft_steps) == 15 and len(dpo_steps) == 7, (len(sft_steps), len(dpo_steps))
    # the closing summary: both stages, the eval verdict, the merge verdict, the paths
    tail = "\n".join(lines[-20:])
    assert re.search(r"sft \(sft\) +done +288 \+ 32 of 320 +72", tail), tail
    assert re.search(r"dpo \(dpo\) +done +272 \+ 48 of 320 +34 .*held-out acc", tail), tail
    assert "eval:   gates PASSED; MMLU 0.250 -> " in tail and "merge:  verified: max |Δlogit|" in tail
    assert f"report:   {out / 'report.html'}" in tail and f"run log:  {out / 'logs' / 'run.log'}" in tail
    assert len(lines) < 80, f"{len(lines)} console lines"


def test_the_full_log_holds_what_the_console_does_not(demo):
    out, proc, _ = demo
    log = (out / "logs" / "run.log").read_text()
    assert "{'loss': " in log  # transformers' raw log dicts: in the log, not on the console
    assert "prefopt: stage sft done" in log  # prefopt's own lines too, in order with the rest
    assert "\r" not in log  # no progress bar fills it


def test_status_shows_every_stage_done_and_a_rerun_that_changes_nothing_leaves_the_folder(demo, tmp_path):
    out, _, env = demo
    st = _cli("status", str(out), env=env)
    assert st.returncode == 0, st.stdout
    assert re.search(r"sft \(sft\) +done", st.stdout) and re.search(r"dpo \(dpo\) +done", st.stdout)
    assert "gates PASSED" in st.stdout and "merge:  verified" in st.stdout
    listed = _cli("status", "--root", str(out.parent), env=env)
    assert listed.returncode == 0 and "2/2 stages done" in listed.stdout and str(out) in listed.stdout
    assert _cli("status", str(tmp_path), env=env).returncode == 2  # not a run folder
    first = (out / "logs" / "run.log").read_text()
    # --quiet: the summary alone (everything is done and unchanged: nothing is trained again)
    again = _cli("run", str(out / "recipe.yaml"), "--quiet", env=env)
    assert again.returncode == 0, again.stdout
    assert "prefopt:" not in again.stdout and not re.search(r"^  \w+ +step ", again.stdout, re.M)
    assert re.search(r"sft \(sft\) +done", again.stdout)
    # it changed nothing in the run folder: its log stays in the user cache (rotation: tests/test_console.py)
    assert (out / "logs" / "run.log").read_text() == first and not (out / "logs" / "run.1.log").exists()
    assert f"run log:  {Path(env['PREFOPT_CACHE_DIR']) / 'logs'}" in again.stdout


def test_demo_kto_recipe_learns_from_unpaired_feedback(tmp_path, tiny_model):
    """The shipped KTO variant, as a person runs it: SFT -> KTO on thumbs-up / thumbs-down rows, the reference the SFT
    model (first-step rewards and KL 0), balanced weights said, the held-out margin gate passed, a verified merge."""
    out = tmp_path / "demo-kto"
    proc = _cli("run", "recipes/demo_kto.yaml", "--output-dir", str(out), "--set", f"model.name_or_path={tiny_model}",
                env=_user_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = json.loads((out / "run.json").read_text())
    kto = manifest["stages"][1]
    assert kto["type"] == "kto" and kto["reference"] == "previous_stage" and kto["status"] == "done"
    first = next(h for h in json.loads((out / "stages" / "01-kto" / "log_history.json").read_text()) if "loss" in h)
    assert first["kl"] == 0 and first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    labels = kto["data"]
    assert "desirable training rows; desirable_weight" in proc.stdout and "(balanced" in proc.stdout
    assert "labels: train" in proc.stdout, "the data step shows the label balance"
    assert kto["metrics"]["eval"]["eval_rewards/margins"] > 0.1, labels
    log = json.loads((out / "eval" / "eval_log.json").read_text())
    assert log["passed"] and log["heldout"]["kto"]["win_rate_vs_base"] > 0.5
    assert json.loads((out / "merged" / "merge_report.json").read_text())["verification"]["passed"]
    assert not NOISE.search(proc.stdout), NOISE.search(proc.stdout)
