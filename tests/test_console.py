"""What a person sees (issue 23): the captured console, `prefopt status` on each state a stage can be in, the plan's
order, the report's verdict card, the typed API. The demo's console as a whole: tests/test_demo.py."""

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

import prefopt
from prefopt import console
from prefopt.cli import main
from prefopt.runs.status import run_status

ROOT = Path(__file__).resolve().parents[1]


def test_captured_console_sends_c_level_and_python_output_to_the_log_only(tmp_path):
    """A child process whose descriptors 1 and 2 are a pipe, as under `| tee`: what libraries write (Python's
    print, a warning, a C-level write to fd 2) lands in the log; prefopt's `say` lines reach the console; a warning
    that matters becomes one `prefopt: note:` line."""
    script = textwrap.dedent(f"""
        import os, sys, warnings
        os.environ["PREFOPT_CACHE_DIR"] = {str(tmp_path / 'cache')!r}
        from prefopt import console
        with console.captured("t") as log:
            print("library print")
            os.write(2, b"C-level write\\n")
            warnings.warn("something deprecated", FutureWarning)
            warnings.warn("Token indices sequence length is longer than the specified maximum", UserWarning)
            from transformers.utils import logging as hf_logging
            hf_logging.get_logger("transformers.tokenization_utils_base").warning(
                "Token indices sequence length is longer than the specified maximum (again)")
            hf_logging.get_logger("transformers.x").warning("You are using a model of type x to instantiate y")
            console.say("prefopt: my line")
        print("after", log)
        with console.captured("t", console.VERBOSE) as log2:
            print("verbose print")
            os.write(2, b"verbose C-level\\n")
        print("after", log2)
    """)
    out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout
    shown = out.stdout.splitlines()
    assert shown[0] == "prefopt: note: a tokenized row is longer than the model's maximum length (details in the log)"
    assert shown[1] == ("prefopt: note: the checkpoint's model type differs from the class loading it (details in "
                        "the log)")
    assert shown[2] == "prefopt: my line" and shown[3].startswith("after ") and len(shown) == 7, shown
    assert shown[4:6] == ["verbose print", "verbose C-level"]  # --verbose: on the console, and in the log
    assert Path(shown[6].split(" ", 1)[1]).read_text() == "verbose print\nverbose C-level\n"
    log = Path(shown[3].split(" ", 1)[1]).read_text()
    for text in ("library print", "C-level write", "FutureWarning: something deprecated", "prefopt: my line",
                 "(again)", "You are using a model of type x"):
        assert text in log


def test_keep_log_rotates_attempts(tmp_path):
    run_dir = tmp_path / "run"
    for i in range(7):
        f = tmp_path / f"attempt{i}.log"
        f.write_text(f"attempt {i}\n")
        assert console.keep_log(f, run_dir) == run_dir / "logs" / "run.log"
    logs = run_dir / "logs"
    assert (logs / "run.log").read_text() == "attempt 6\n" and (logs / "run.1.log").read_text() == "attempt 5\n"
    assert (logs / "run.5.log").read_text() == "attempt 1\n" and not (logs / "run.6.log").exists()


def test_checkpointing_arguments_raise_no_deprecation_warning(tmp_path):
    from trl import SFTConfig

    from prefopt.config import recipe_from_dict
    from prefopt.stages.common import training_args

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    rec = recipe_from_dict({"name": "x", "model": {"name_or_path": "m"},
                            "stages": [{"name": "s", "type": "sft", "data": {"path": str(data)},
                                        "train": {"gradient_checkpointing": True}}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cfg = SFTConfig(**training_args(rec.stages[0].train, output_dir=tmp_path, seed=1, report_to=[], run_name="x",
                                        has_eval=False))
    assert cfg.gradient_checkpointing is True  # (transformers mirrors the new name into the old one)
    off = SFTConfig(**training_args(rec.stages[0].train.model_copy(update={"gradient_checkpointing": False}),
                                    output_dir=tmp_path, seed=1, report_to=[], run_name="x", has_eval=False),
                    )
    assert off.gradient_checkpointing is False


def _fake_run(tmp_path, statuses: dict) -> Path:
    """A run folder whose run.json says what `statuses` says (no training)."""
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: fake\nstages:\n" + "".join(
        f"  - {{name: {n}, type: {'sft' if i == 0 else 'dpo'}}}\n" for i, n in enumerate(["a", "b", "c", "d", "e"])))
    stages = []
    for i, (name, entry) in enumerate(statuses.items()):
        stages.append({"name": name, "type": "sft" if i == 0 else "dpo", "adapter": f"stages/{i:02d}-{name}/adapter",
                       "data": {"input_rows": 10, "train_rows": 8, "eval_rows": 2}, **entry})
    (run / "run.json").write_text(json.dumps({"run_id": "r1", "recipe_name": "fake", "stages": stages}))
    return run


def test_status_tells_each_state(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    run = _fake_run(tmp_path, {
        "a": {"status": "done", "metrics": {"train": {"train_loss": 2.0, "steps": 12, "train_runtime": 3.5},
                                            "eval": {"eval_loss": 1.5}}},
        "b": {"status": "done", "reused_from": "/cache/stages/abc", "metrics": {}},
        "c": {"status": "running", "pid": int(dead), "host": __import__("socket").gethostname()},
        "d": {"status": "failed", "error": "RuntimeError: CUDA out of memory"},
    })
    ckpt = run / "stages" / ".02-c.tmp" / "trainer" / "checkpoint-40"
    ckpt.mkdir(parents=True)
    (ckpt / "prefopt_checkpoint_complete").write_text("")
    st = run_status(run)
    states = {s.name: (s.state, s.detail) for s in st.stages}
    assert states == {"a": ("done", ""), "b": ("reused", "from /cache/stages/abc"),
                      "c": ("interrupted", "resumable from step 40"),
                      "d": ("failed", "RuntimeError: CUDA out of memory"), "e": ("not started", "")}
    assert st.stages[0].steps == 12 and st.stages[0].key_metric == "eval loss 1.5000"
    res = CliRunner().invoke(main, ["status", str(run)])
    assert res.exit_code == 0, res.output
    for text in ("interrupted (resumable from step 40)", "failed (RuntimeError: CUDA out of memory)", "not started",
                 "eval:   not run", "merge:  not run"):
        assert text in res.output
    # a running stage whose process is alive is running
    live = json.loads((run / "run.json").read_text())
    live["stages"][2]["pid"] = os.getpid()
    (run / "run.json").write_text(json.dumps(live))
    assert run_status(run).stages[2].state == "running"
    assert CliRunner().invoke(main, ["status", str(tmp_path / "nope")]).exit_code == 2


def test_plan_leads_with_the_stages_and_shows_the_recipe_on_request(tmp_path, tiny_model):
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(tmp_path / "c")}
    args = [sys.executable, "-m", "prefopt", "plan", "recipes/demo.yaml", "--set", f"model.name_or_path={tiny_model}"]
    out = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plan for recipe demo: 2 stage(s)"), lines[:3]
    assert "# stages" in lines[:4] and "# resolved recipe" not in out.stdout and "kernels-community" not in out.stdout
    assert len(lines) < 40, len(lines)
    shown = subprocess.run(args + ["--show-recipe"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "# resolved recipe" in shown.stdout and "beta: 0.1" in shown.stdout


def test_report_leads_with_the_verdict_card(tmp_path):
    run = _fake_run(tmp_path, {"a": {"status": "done", "metrics": {"train": {"train_loss": 2.0}}}})
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    text = (run / "report.html").read_text()
    assert text.index("id='verdict'") < text.index("<h2>Stages</h2>")
    assert "Verdict: not finished" in text and "stages: 1 of 5 done" in text and "merge: <b class=''>not run" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium")
def test_report_first_screen_shows_the_verdict_in_chromium(tmp_path):
    run = _fake_run(tmp_path, {"a": {"status": "done", "metrics": {"train": {"train_loss": 2.0}}}})
    CliRunner().invoke(main, ["report", str(run)])
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
                    f"--screenshot={shot}", (run / "report.html").as_uri()], capture_output=True, timeout=120)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (run / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert "Verdict: not finished" in dom


def test_the_api_is_typed_and_documented():
    for fn in (prefopt.run, prefopt.plan, prefopt.merge, prefopt.evaluate, prefopt.status):
        sig = inspect.signature(fn)
        missing = [n for n, p in sig.parameters.items() if p.annotation is inspect.Parameter.empty
                   and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        assert not missing and sig.return_annotation is not inspect.Signature.empty, (fn.__name__, missing)
        assert "Returns" in (fn.__doc__ or "") or "Raises" in (fn.__doc__ or ""), fn.__name__
    assert inspect.signature(prefopt.run).return_annotation in ("RunResult", prefopt.RunResult)
    assert (Path(prefopt.__file__).parent / "py.typed").is_file()
    with pytest.raises(prefopt.RecipeError, match="recipe file not found"):
        prefopt.run("no-such-recipe.yaml", quiet=True)


def test_api_quiet_says_nothing_and_echo_gets_the_progress(tmp_path, tiny_model, small_data, capsys):
    from conftest import chain_recipe

    raw = chain_recipe(tiny_model, small_data, None)
    raw["stages"][0]["train"].update(max_steps=2, logging_steps=1)
    prefopt.run(prefopt.recipe_from_dict(raw), output_dir=tmp_path / "q", quiet=True)
    captured = capsys.readouterr()
    assert "step" not in captured.err and "prefopt" not in captured.err and "prefopt" not in captured.out
    heard = []
    raw["seed"] = 7  # (other inputs: trained, not reused from the shared store)
    prefopt.run(prefopt.recipe_from_dict(raw), output_dir=tmp_path / "e", echo=heard.append)
    assert any(line.startswith("  sft      step 2/2  loss ") for line in heard), [x for x in heard if "sft" in x]
    assert "step" not in capsys.readouterr().err


def test_verbose_tee_survives_a_child_that_keeps_the_pipe(tmp_path):
    """A child process (wandb's service) that inherits the captured descriptors and outlives the command: the
    console comes back at once and nothing the child writes later lands in a file opened after the command."""
    script = textwrap.dedent(f"""
        import os, subprocess, time
        os.environ["PREFOPT_CACHE_DIR"] = {str(tmp_path / 'cache')!r}
        from prefopt import console
        t0 = time.monotonic()
        with console.captured("t", console.VERBOSE):
            subprocess.Popen(["sh", "-c", "sleep 2; echo late"])
        took = time.monotonic() - t0
        with open({str(tmp_path / 'user.txt')!r}, "w") as f:
            f.write("mine\\n")
            time.sleep(3)
        print("took", took)
    """)
    out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout
    assert (tmp_path / "user.txt").read_text() == "mine\n"
    assert float(out.stdout.split("took ")[1].split()[0]) < 2, out.stdout
