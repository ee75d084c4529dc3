"""Every knowable error surfaces in `prefopt plan` (and at the start of `prefopt run`): exit code 2, the key
path and its YAML line, no traceback, no model weights loaded."""

import json
import time

import pytest
import yaml
from click.testing import CliRunner
from conftest import chain_recipe, write_jsonl

from prefopt.cli import main


@pytest.fixture()
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import transformers

    import prefopt.models

    def refuse(*a, **k):
        raise AssertionError("preflight loaded model weights")

    monkeypatch.setattr(prefopt.models, "load_base_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def plan(path, *args):
    result = CliRunner().invoke(main, ["plan", str(path), *args])
    return result, result.output + (result.stderr if hasattr(result, "stderr") else "")


def _set(raw, dotted, value):
    node = raw
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for p in parts[:-1]:
        node = node.setdefault(p, {}) if isinstance(node, dict) else node[p]
    node[parts[-1]] = value


def _bad_utf8(raw, data, tmp_path):
    lines = data["sft"].read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"kind", b"k\xe9nd", 1).replace(b"the", b"th\xe9", 1)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"".join(lines))
    raw["stages"][0]["data"]["path"] = str(bad)


def _epochs_tiny(raw, data, tmp_path):
    tr = raw["stages"][0]["train"]
    tr.update(max_steps=-1, epochs=0.0001, warmup_ratio=0.05)


def _kto(raw, t, rows=None, **opts):
    """Stage 1 becomes a KTO stage (on `rows` when given, else on its paired file, split)."""
    st = raw["stages"][1]
    st["type"] = "kto"
    st.update(opts)
    if rows is not None:
        st["data"]["path"] = str(write_jsonl(t / "feedback.jsonl", rows))


def _feedback(n=12, bad_row=None, **change):
    rows = [{"prompt": f"Tell me about the topic number {i}.", "completion": f"It is kind and calm, {i}.",
             "label": i % 2 == 0} for i in range(n)]
    if bad_row is not None:
        rows[bad_row] = {k: v for k, v in {**rows[bad_row], **change}.items() if v is not None}
    return rows


CASES = {
    # name: (change to the recipe dict, key path the message must name, more text it must hold)
    "unknown optim": (lambda r, d, t: _set(r, "stages.0.train.optim", "adamw_turbo"),
                      "stages[0].train.optim", "unknown optim 'adamw_turbo'"),
    "unknown scheduler": (lambda r, d, t: _set(r, "stages.1.train.scheduler", "cosine_fancy"),
                          "stages[1].train.scheduler", "unknown scheduler"),
    "label_smoothing a string": (lambda r, d, t: _set(r, "stages.1.trainer_kwargs", {"label_smoothing": "high"}),
                                 "stages[1].trainer_kwargs.label_smoothing", "got 'high'"),
    "eval_accumulation_steps a string": (
        lambda r, d, t: _set(r, "stages.0.trainer_kwargs", {"eval_accumulation_steps": "two"}),
        "stages[0].trainer_kwargs.eval_accumulation_steps", "got 'two'"),
    "dpo max_length a string": (lambda r, d, t: _set(r, "stages.1.trainer_kwargs", {"max_length": "long"}),
                                "stages[1].trainer_kwargs.max_length", "got 'long'"),
    "target_modules match nothing": (lambda r, d, t: _set(r, "adapter.target_modules", ["q_proj", "qkv_proj"]),
                                     "adapter.target_modules", "'qkv_proj' matches no module"),
    "chat template syntax error": (
        lambda r, d, t: _set(r, "model.chat_template", "{% for m in messages %}{{ m['content'] }"),
        "model.chat_template", "does not render"),
    "model folder missing": (lambda r, d, t: _set(r, "model.name_or_path", str(t / "models" / "nope")),
                             "model.name_or_path", "folder not found"),
    "mistyped relative model path": (lambda r, d, t: (t.joinpath("models").mkdir(),
                                                      _set(r, "model.name_or_path", "models/tiny-lama")),
                                     "model.name_or_path", "folder not found"),
    "a float YAML reads as a string": (lambda r, d, t: _set(r, "stages.1.trainer_kwargs", {"max_grad_norm": "1e-3"}),
                                       "stages[1].trainer_kwargs.max_grad_norm", "write it with a dot"),
    "eval_fraction leaves no training row": (lambda r, d, t: _set(r, "stages.0.data.eval_fraction", 0.99),
                                             "stages[0].data.eval_fraction", "leaves no training row"),
    "epochs so small the only step has lr 0": (_epochs_tiny, "stages[0].train.epochs", "learning rate 0"),
    "data file not UTF-8": (_bad_utf8, "stages[0].data", "latin1.jsonl line 3: not UTF-8"),
    "every preference row dropped by max_length": (lambda r, d, t: _set(r, "stages.1.train.max_length", 4),
                                                   "stages[1].train.max_length", "none would train"),
    "decontamination set missing": (lambda r, d, t: _set(r, "stages.1.data.quality", {"decontaminate": ["ev/x.jsonl"]}),
                                    "stages[1].data.quality.decontaminate[0]", "file not found: ev/x.jsonl"),
    "a mixture source missing": (lambda r, d, t: _set(r, "stages.0.data.path", [{"path": str(d["sft"])},
                                                                               {"path": "nope.jsonl", "rows": 5}]),
                                 "stages[0].data.path[1].path", "file not found: nope.jsonl"),
    "fraction and rows both given": (lambda r, d, t: _set(r, "stages.0.data.path", [{"path": str(d["sft"]),
                                                                                   "rows": 5, "fraction": 0.5}]),
                                     "stages[0].data.path[0]", "give fraction or rows, not both"),
    # issue 24: KTO rows, multi-loss DPO, adapter inits
    "kto label not a boolean": (lambda r, d, t: _kto(r, t, _feedback(bad_row=3, label="yes")),
                                "stages[1].data", "feedback.jsonl row 4: label must be true (desirable) or false"),
    "kto completion missing": (lambda r, d, t: _kto(r, t, _feedback(bad_row=5, completion=None)),
                               "stages[1].data", "feedback.jsonl row 6: missing completion"),
    "kto rows of one label only": (lambda r, d, t: _kto(r, t, [dict(x, label=True) for x in _feedback()]),
                                   "stages[1].data", "needs training rows of both labels"),
    "kto batch of one": (lambda r, d, t: (_kto(r, t), _set(r, "stages.1.train.batch_size", 1)),
                         "stages[1].train.batch_size", "needs batch_size 2 or more"),
    "kto reference filter": (lambda r, d, t: (_kto(r, t), _set(r, "stages.1.data.quality",
                                                               {"reference_filter": {"score": "auto"}})),
                             "stages[1].data.quality.reference_filter", "not for a kto stage"),
    "loss weights of the wrong length": (lambda r, d, t: (_set(r, "stages.1.loss_type", ["sigmoid", "sft"]),
                                                          _set(r, "stages.1.loss_weights", [1.0])),
                                         "stages[1].loss_weights", "1 weight(s) for 2 loss(es)"),
    "unknown loss in a list": (lambda r, d, t: _set(r, "stages.1.loss_type", ["sigmoid", "sfft"]),
                               "stages[1].loss_type[1]", "unknown DPO loss 'sfft'; did you mean sft?"),
    "unknown f-divergence": (lambda r, d, t: _set(r, "stages.1.f_divergence_type", "kl_forward"),
                             "stages[1].f_divergence_type", "unknown f-divergence 'kl_forward'; did you mean"),
    "f-divergence with a loss that has none": (lambda r, d, t: (_set(r, "stages.1.loss_type", "bco_pair"),
                                                                _set(r, "stages.1.f_divergence_type", "js_divergence")),
                                               "stages[1].f_divergence_type", "not bco_pair"),
    "weight-rewriting init with a DPO reference base": (
        lambda r, d, t: (_set(r, "adapter.init", "pissa"), _set(r, "model.quantization", "none"),
                         _set(r, "stages.1.reference", "base")),
        "adapter.init", "stages[1] (dpo, dpo) has reference: base"),
    "pissa on a quantized base": (lambda r, d, t: _set(r, "adapter.init", "pissa"),
                                  "adapter.init", "Please initialize PiSSA under float32"),
    "reward accuracy gate after a KTO stage": (
        lambda r, d, t: (_kto(r, t), _set(r, "eval", {"mmlu": None, "completions": {"n": 0},
                                                      "gates": {"max_mmlu_drop": None, "min_reward_accuracy": 0.6}})),
        "eval.gates.min_reward_accuracy", "no pairs to score"),
    "reference filter score for the wrong stage": (
        lambda r, d, t: _set(r, "stages.0.data.quality", {"reference_filter": {"score": "margin"}}),
        "stages[0].data.quality.reference_filter.score", "margin scores preference rows"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_names_the_key_with_exit_2(case, tmp_path, tiny_model, small_data, no_weights, monkeypatch):
    change, key, text = CASES[case]
    raw = chain_recipe(tiny_model, small_data, "dpo")
    change(raw, small_data, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.perf_counter()
    monkeypatch.chdir(tmp_path)  # relative paths resolve here (and beside the recipe)
    result, out = plan(path)
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    assert f"{key} (" in out or f"{key}:" in out, out
    assert text in out, out
    assert f"{path} line " in out, "the YAML line is named"
    assert time.perf_counter() - t0 < 30


def test_duplicate_yaml_key_names_both_lines(tmp_path, tiny_model, small_data, no_weights):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    text = yaml.safe_dump(raw, sort_keys=False)
    text = text.replace("    learning_rate: 0.003\n",
                        "    learning_rate: 0.003\n    epochs: 2\n    learning_rate: 0.1\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    lines = text.splitlines()
    first, second = [n + 1 for n, s in enumerate(lines) if s.strip() == "learning_rate: 0.003" or
                     s.strip() == "learning_rate: 0.1"][:2]
    result, out = plan(path)
    assert result.exit_code == 2 and "Traceback" not in out, out
    assert f"stages[0].train.learning_rate: duplicate key (lines {first} and {second})" in out, out


def test_wandb_online_without_credentials(tmp_path, tiny_model, small_data, no_weights, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(chain_recipe(tiny_model, small_data, "dpo", wandb="online"), sort_keys=False))
    result, out = plan(path)
    assert result.exit_code == 2 and "Traceback" not in out, out
    assert "tracking.wandb.mode (" in out and "needs W&B credentials" in out, out
    # the environment's WANDB_MODE overrides the recipe, both ways
    monkeypatch.setenv("WANDB_MODE", "offline")
    result, out = plan(path)
    assert result.exit_code == 0, out
    quiet = tmp_path / "q.yaml"
    quiet.write_text(yaml.safe_dump(chain_recipe(tiny_model, small_data, "dpo", wandb="offline"), sort_keys=False))
    monkeypatch.setenv("WANDB_MODE", "online")
    result, out = plan(quiet)
    assert result.exit_code == 2 and "WANDB_MODE=online in the environment" in out, out


def test_every_problem_at_once_and_run_refuses_before_writing(tmp_path, tiny_model, small_data, no_weights):
    raw = chain_recipe(tiny_model, small_data, "dpo")
    _set(raw, "stages.0.train.optim", "adamw_turbo")
    _set(raw, "adapter.target_modules", ["qkv"])
    _set(raw, "stages.1.trainer_kwargs", {"label_smoothing": "high"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(main, ["run", str(path), "--output-dir", str(tmp_path / "run")])
    out = result.output + getattr(result, "stderr", "")
    assert result.exit_code == 2 and "3 problems" in out, out
    assert not (tmp_path / "run").exists()


def test_some_rows_over_max_length_are_counted_and_left_out(tmp_path, tiny_model, small_data, no_weights):
    from prefopt import recipe_from_dict
    from prefopt.data.report import summary_lines
    from prefopt.models import load_tokenizer
    from prefopt.preflight import preflight

    rows = [json.loads(s) for s in small_data["prefs"].read_text().splitlines()]
    tok = load_tokenizer(str(tiny_model))

    def ids(msgs, **kw):  # as DPOTrainer tokenizes: the chat template, the prompt with the generation prompt
        return tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"]

    lengths = sorted(len(ids(r["prompt"], add_generation_prompt=True)) for r in rows)
    cut = lengths[-1]  # the longest prompts fill max_length
    n_long = sum(n >= cut for n in lengths)
    # rows that survive but whose answers are the same tokens once cut to max_length carry no signal either
    n_same = sum(len(ids(r["prompt"], add_generation_prompt=True)) < cut and
                 ids(r["prompt"] + r["chosen"])[:cut] == ids(r["prompt"] + r["rejected"])[:cut] for r in rows)
    raw = chain_recipe(tiny_model, small_data, "dpo")
    _set(raw, "stages.1.train.max_length", cut)
    _set(raw, "stages.1.data.eval_fraction", 0)
    _set(raw, "stages.1.data.quality", {"dedup": "none"})
    checked = preflight(recipe_from_dict(raw))
    assert 0 < n_long and n_long + n_same < len(rows)
    assert len(checked.data[1].train) == len(rows) - n_long - n_same
    report = checked.data[1].report
    assert report["dropped"]["too_long"] == n_long and report["dropped"]["identical_pair"] == n_same
    assert any(f"dropped {n_long:>6} too_long" in s for s in summary_lines(report)), summary_lines(report)


def test_an_unexpected_error_is_one_line_and_a_log(tmp_path, tiny_model, small_data, monkeypatch):
    import prefopt.cli

    def broken(recipe, **_):  # make_plan takes the memory plan's options as keywords
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(prefopt.cli, "make_plan", broken)  # (the plan the command makes)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(chain_recipe(tiny_model, small_data, "dpo"), sort_keys=False))
    result, out = plan(path)
    assert result.exit_code == 1 and "Traceback" not in out
    assert "unexpected error" in out and "ZeroDivisionError: a bug" in out
    log = out.rsplit("full traceback in ", 1)[1].strip()
    assert "Traceback" in open(log).read()


def test_a_set_value_that_is_not_yaml_is_a_user_error(tmp_path, tiny_model, small_data, no_weights):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(chain_recipe(tiny_model, small_data, "dpo"), sort_keys=False))
    result, out = plan(path, "--set", "model.chat_template={% if %}")
    assert result.exit_code == 2, out
    assert "--set model.chat_template: the value is not valid YAML" in out and "Traceback" not in out
