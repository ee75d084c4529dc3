import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import DEMO_DATA, chain_recipe

ROOT = Path(__file__).resolve().parents[1]


def prefopt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prefopt.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_version_and_help():
    from prefopt import __version__

    out = prefopt("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    assert "run" in prefopt("--help").stdout


def test_broken_recipe_exits_2_with_every_problem_and_no_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nmodel: {name_or_path: m, quantization: nf5}\nstages:\n"
        "  - {name: a, type: sft, data: {path: missing.jsonl}, trainn: {}}\n"
    )
    out = prefopt("run", str(path), "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "model.quantization: Input should be 'nf4', 'int8' or 'none', got 'nf5'" in out.stderr
    assert "stages[0].trainn: unknown key; did you mean train?" in out.stderr
    assert not (tmp_path / "run").exists(), "a rejected recipe writes nothing"


def test_bad_data_rows_and_bad_trainer_kwargs_exit_2(tmp_path, tiny_model):
    data = {"sft": DEMO_DATA / "sft.jsonl", "prefs": tmp_path / "p.jsonl"}
    data["prefs"].write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    raw = chain_recipe(tiny_model, data)
    raw["stages"][0]["trainer_kwargs"] = {"packin": True}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = prefopt("run", str(path), "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    # with the YAML line of the key since issue 21 (it had none): stages[0].trainer_kwargs.packin (r.yaml line N): ...
    assert re.search(r"stages\[0\]\.trainer_kwargs\.packin \(\S*r\.yaml line \d+\): unknown key; did you mean "
                     r"packing\?", out.stderr), out.stderr
    assert "p.jsonl row 2: missing rejected" in out.stderr


def test_plan_shows_stages_sizes_and_trainable_params(tmp_path, tiny_model):
    raw = chain_recipe(tiny_model, {"sft": DEMO_DATA / "sft.jsonl", "prefs": DEMO_DATA / "prefs.jsonl"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = prefopt("plan", str(path), "--set", "stages.1.beta=0.25", "--show-recipe")
    assert out.returncode == 0, out.stderr
    assert "beta: 0.25" in out.stdout  # the resolved recipe (issue 23: shown on request), override applied
    assert "288 train / 32 eval rows" in out.stdout
    assert "reference: a frozen copy of the adapter from 'sft'" in out.stdout
    assert "trainable params: " in out.stdout and "unknown" not in out.stdout
