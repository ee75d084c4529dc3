"""The recipe loader under fuzzing: hypothesis mutates a valid recipe (type swaps, missing and extra keys,
out-of-range numbers, odd unicode, YAML oddities: 1e-5 read as a string, no/on read as booleans, duplicate keys,
anchors, tabs) and every case must either load or raise RecipeError whose every line names a key path -- never
another exception (which the CLI would show as a traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefopt.config import load_recipe
from prefopt.errors import RecipeError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="module")
def small_data_files() -> dict:
    return {"sft": DEMO / "sft.jsonl", "prefs": DEMO / "prefs.jsonl"}

BASE = """\
name: fuzz
seed: 42
model:
  name_or_path: {model}
  quantization: nf4
  dtype: float32
adapter:
  method: dora
  r: 16
  alpha: 16
  dropout: 0.05
  target_modules: all-linear
stages:
  - name: sft
    type: sft
    data: {{path: {sft}, eval_fraction: 0.1, quality: {{dedup: near, near_threshold: 0.85}}}}
    train: {{epochs: 1, learning_rate: 2.0e-4, batch_size: 2, max_length: 128, checkpoint_every: 10%}}
  - name: dpo
    type: dpo
    data: {{path: {prefs}}}
    beta: 0.1
    loss_type: sigmoid
    reference: previous_stage
tracking:
  wandb: {{project: p, mode: disabled}}
merge:
  base: auto
  verify: true
"""

ODD_VALUES = ["1e-5", "1.0e-5", "no", "on", "off", "yes", "~", "null", "[]", "{}", "-1", "0", "1e309", ".nan",
              "-.inf", "'ünïcødé'", "\"\\u0000\"", "'👍'", "2024-01-01", "0x1F", "0o17", "!!binary aGk=", "&a 1",
              "*a", "[1, [2, [3]]]", "{a: {b: {c: d}}}", "'  '", "\"\\t\"", "!!python/object:os.system ls",
              "|\n    block", "9" * 40, "'a'b", "[", "{", "- x", "True", "FALSE", "1_000", "+1", ":"]

KEYS = ["name", "seed", "model", "name_or_path", "quantization", "dtype", "adapter", "method", "r", "alpha",
        "dropout", "target_modules", "stages", "type", "data", "path", "eval_fraction", "train", "epochs",
        "learning_rate", "batch_size", "max_length", "beta", "loss_type", "reference", "tracking", "wandb",
        "mode", "merge", "base", "verify", "quality", "dedup", "near_threshold", "checkpoint_every"]


@st.composite
def mutated(draw):
    ops = draw(st.lists(st.tuples(st.sampled_from(["value", "drop", "dup", "extra", "unicode", "indent", "raw"]),
                                  st.integers(0, 10_000), st.sampled_from(ODD_VALUES),
                                  st.text(min_size=1, max_size=12)), min_size=1, max_size=4))
    return ops


def _apply(text: str, ops) -> str:
    lines = text.splitlines()
    for op, n, odd, junk in ops:
        i = n % len(lines)
        line = lines[i]
        indent = line[: len(line) - len(line.lstrip())]
        if op == "value" and ":" in line:
            key = line.split(":", 1)[0]
            lines[i] = f"{key}: {odd}"
        elif op == "drop":
            del lines[i]
        elif op == "dup" and ":" in line:
            lines.insert(i + 1, line)  # the same key twice in one mapping
        elif op == "extra":
            lines.insert(i, f"{indent}{KEYS[n % len(KEYS)]}x: {odd}")
        elif op == "unicode":
            lines[i] = line + junk
        elif op == "indent":
            lines[i] = ("\t" if n % 3 == 0 else " " * (n % 5)) + line
        elif op == "raw":
            lines.insert(i, junk)
        if not lines:
            lines = ["{}"]
    return "\n".join(lines) + "\n"


# a problem line: a key path (name, name.sub, stages[0].x) followed by ':' or its line, or a whole-file problem
PROBLEM = re.compile(r"^((\(recipe\)|[A-Za-z_][\w-]*(\[\d+\])*(\.[\w-]+(\[\d+\])*)*)(:| \([^)]*line \d+\):)|"
                     r"--set .+|not valid YAML|"
                     r"the recipe must be a YAML mapping|not UTF-8|recipe file not found)")


def _check(tmp: Path, text: str) -> str:
    path = tmp / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        load_recipe(path)
        return "loaded"
    except RecipeError as e:
        assert e.problems, text
        for p in e.problems:
            assert PROBLEM.match(p), f"no key path in {p!r}\nrecipe:\n{text}"
        return "refused"


def test_fuzzed_recipes_load_or_name_a_key(tmp_path_factory, small_data_files):
    tmp = tmp_path_factory.mktemp("fuzz")
    base = BASE.format(model="m", sft=small_data_files["sft"], prefs=small_data_files["prefs"])
    assert _check(tmp, base) == "loaded"
    seen = {"loaded": 0, "refused": 0}

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def run(ops):
        seen[_check(tmp, _apply(base, ops))] += 1

    run()
    assert sum(seen.values()) >= 1000
    assert seen["loaded"] > 0 and seen["refused"] > 0, seen


def test_yaml_oddities_are_named(tmp_path, small_data_files):
    base = BASE.format(model="m", sft=small_data_files["sft"], prefs=small_data_files["prefs"])
    cases = {
        "stages[1].beta": base.replace("beta: 0.1", "beta: no"),  # YAML 1.1: a boolean
        "seed": base.replace("seed: 42", "seed: 1e-5"),  # PyYAML: a string
        "adapter.r": base.replace("  r: 16", "  r: 16\n  r: 8"),  # duplicate key
    }
    for key, text in cases.items():
        (tmp_path / "r.yaml").write_text(text)
        try:
            load_recipe(tmp_path / "r.yaml")
            raise AssertionError(f"{key}: loaded")
        except RecipeError as e:
            assert any(p.startswith(key) for p in e.problems), (key, e.problems)


def test_the_fuzzer_can_fail(tmp_path, small_data_files, monkeypatch):
    """The checks bite: a loader bug escapes _check, and a problem line without a key path is not accepted."""
    import prefopt.config.load

    base = BASE.format(model="m", sft=small_data_files["sft"], prefs=small_data_files["prefs"])
    assert _check(tmp_path, _apply(base, [("value", 1, "!!python/object:os.system ls", "x")])) == "refused"
    assert not PROBLEM.match("something went wrong") and not PROBLEM.match("Traceback (most recent call last)")
    assert PROBLEM.match("stages[1].train.max_length (r.yaml line 3): too long") and PROBLEM.match("seed: must be ...")
    monkeypatch.setattr(prefopt.config.load, "line_map", lambda text: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _check(tmp_path, base)
