from pathlib import Path

import pytest
import yaml

from prefopt import RecipeError, load_recipe, recipe_from_dict
from prefopt.config import DPOStage, Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_parses(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.stages, "a recipe has stages"
    # the resolved recipe round-trips: every default filled in, nothing the schema rejects
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


def test_shipped_chain_recipes_cover_each_preference_method():
    types = {load_recipe(p).stages[-1].type for p in RECIPES if p.name.startswith("sft_then_")}
    assert types == {"dpo", "kto", "orpo", "simpo"}


def test_defaults_follow_the_recipe_guide(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    r = recipe_from_dict({"name": "x", "model": {"name_or_path": "m"},
                          "stages": [{"name": "s", "type": "sft", "data": {"path": str(data)}}]})
    a, t = r.adapter, r.stages[0].train
    assert (a.method, a.r, a.alpha, a.dropout, a.target_modules) == ("dora", 16, 16, 0.05, "all-linear")
    assert (t.learning_rate, t.scheduler, t.warmup_ratio) == (2e-4, "cosine", 0.05)
    assert r.model.quantization == "nf4"
    # the optimizer updates every adapter tensor in one kernel (DoRA has 50% more tensors than LoRA), and the
    # name reaches the trainer's config
    from trl import SFTConfig

    from prefopt.stages.common import training_args

    assert t.optim == "adamw_torch_fused"
    args = training_args(t, output_dir=tmp_path / "o", seed=0, report_to=[], run_name="x", has_eval=False)
    assert SFTConfig(**args).optim == "adamw_torch_fused"
    assert DPOStage.model_fields["reference"].default == "previous_stage"
    # every field carries help text
    for model in (Recipe, DPOStage, type(a), type(t), type(r.model), type(r.stages[0].data), type(r.tracking)):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no help text"


BROKEN = """\
name: broken
model:
  name_or_path: some/model
  quantisation: nf4
adapter:
  r: sixteen
stages:
  - name: sft
    type: sft
    data: {path: does/not/exist.jsonl}
    train: {lerning_rate: 1.0e-4}
  - name: sft
    type: dpoo
    data: {path: prefs.jsonl}
  - name: dpo
    type: dpo
    beta: -0.1
    data: {path: prefs.jsonl}
"""


def test_broken_recipe_lists_every_problem_with_path_and_line(tmp_path):
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    expect = [
        "model.quantisation: unknown key; did you mean quantization?",
        "line 4",
        "adapter.r:",
        "line 6",
        "stages[0].train.lerning_rate: unknown key; did you mean learning_rate?",
        "line 11",
        "stages[1].type: unknown stage type 'dpoo'; did you mean dpo?",
        "stages[2].beta: Input should be greater than 0",
        "line 17",
    ]
    for e in expect:
        assert e in msg, f"missing {e!r} in:\n{msg}"
    assert len(exc.value.problems) == 5


def test_missing_file_and_duplicate_names(tmp_path):
    recipe = {"name": "x", "model": {"name_or_path": "m"},
              "stages": [{"name": "a", "type": "sft", "data": {"path": str(tmp_path / "nope.jsonl")}}]}
    with pytest.raises(RecipeError, match=r"stages\[0\].data.path: file not found"):
        recipe_from_dict(recipe)
    (tmp_path / "ok.jsonl").write_text('{"text": "x"}\n')
    stage = {"name": "a", "type": "sft", "data": {"path": str(tmp_path / "ok.jsonl")}}
    with pytest.raises(RecipeError, match=r"stages\[1\].name: 'a' is already used by stages\[0\]"):
        recipe_from_dict({"name": "x", "model": {"name_or_path": "m"}, "stages": [stage, dict(stage)]})


def test_overrides_set_values_and_are_validated(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    raw = {"name": "x", "model": {"name_or_path": "m"},
           "stages": [{"name": "d", "type": "dpo", "data": {"path": str(tmp_path / "p.jsonl")}}]}
    r = recipe_from_dict(raw, overrides={"stages.0.beta": 0.3, "adapter.r": 8})
    assert r.stages[0].beta == 0.3 and r.adapter.r == 8
    r = recipe_from_dict(raw, overrides=["stages.0.train.learning_rate=1e-5"])
    assert r.stages[0].train.learning_rate == 1e-5
    with pytest.raises(RecipeError, match="greater than 0"):
        recipe_from_dict(raw, overrides=["stages.0.beta=-1"])
    # issue 21: the message names what exists (the stages by name, the indexes), not only "no such list item"
    with pytest.raises(RecipeError, match=r"'stages' has no item 3; name one of d, or give an index 0-0"):
        recipe_from_dict(raw, overrides=["stages.3.beta=1"])
    assert recipe_from_dict(raw, overrides=["stages.d.beta=0.5"]).stages[0].beta == 0.5


def test_dpo_loss_table_matches_the_installed_trl():
    """prefopt owns its table of DPO loss types (stages/dpo.py); the installed TRL must list the same ones, so an
    upgrade that adds or drops one fails here rather than in a user's recipe check."""
    import re

    from trl import DPOConfig

    from prefopt.stages.dpo import LOSS_TYPES

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(LOSS_TYPES)
