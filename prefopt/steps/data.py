"""The data step of a run: every stage's rows read, checked, filtered, split and reported.

`prefopt run` takes the rows preflight prepared (what was checked is what is trained on) and runs the opt-in
reference-model filter on the model each stage loads (`reference_filter`). `prefopt data RECIPE` (`run_data_step`)
does the data step of every stage without training, into runs/<name>/data/: no model is loaded (only the
tokenizer, for the token checks) unless a stage asks for the reference filter; then the base is loaded once, with
the previous stage's adapter from the run folder when that stage is done (a stage whose reference is not trained yet
is reported as pending: its filter runs when `prefopt run` starts it).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from .. import dist
from ..data import data_problem, stage_data, trained_max_length
from ..data.reference import apply_reference_filter, write_scores
from ..data.report import summary_lines, write_reports
from ..errors import DataError, RecipeError
from ..models import ModelSpec, adapter_config_from_section, load_model
from ..preflight import build_trl_config, check_model, check_train_names
from ..runs import folder as runfolder


def reference_filter(model, tokenizer, stage, data, folder: Path, *, first_stage: bool, seed: int) -> bool:
    """The opt-in reference-model filter, on the model the stage has just loaded (base + the running adapter);
    whether it dropped rows. Every rank filters (the same rows: deterministic); the main process writes the scores."""
    if stage.data.quality.reference_filter is None:
        return False
    use_base = first_stage or stage.type == "sft" or getattr(stage, "reference", None) == "base"
    scores = apply_reference_filter(model, tokenizer, stage, data, use_base=use_base,
                                    max_length=trained_max_length(stage), seed=seed)
    if dist.is_main():
        write_scores(folder, scores)
    return bool(data.report["reference_filter"]["dropped"])


def run_data_step(recipe, *, output_dir=None, echo=print) -> Path:
    """`prefopt data`: each stage's data report and review sample in runs/<name>/data/NN-<stage>/."""
    run_dir = runfolder.run_dir_of(recipe.name, output_dir)
    runfolder.check_output_dir(run_dir, recipe_name=recipe.name, stages=[(s.name, s.type) for s in recipe.stages],
                               fresh=False)
    recipe = runfolder.self_contained(recipe)
    problems, tokenizer = check_model(recipe)
    datas = []
    for i in range(len(recipe.stages)):
        if not check_train_names(recipe, i):
            problems += build_trl_config(recipe, i)[1]
        try:
            datas.append(stage_data(recipe, i, tokenizer))
        except DataError as e:
            problems.append(data_problem(recipe, i, e))
    if problems:
        raise RecipeError(problems, recipe.source)

    out = run_dir / runfolder.DATA
    out.mkdir(parents=True, exist_ok=True)
    runfolder.write_atomic(out / runfolder.DATA_MANIFEST, json.dumps(
        {"recipe_name": recipe.name, "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
         "stages": [recipe.stage_dirname(i) for i in range(len(recipe.stages))]}, indent=2))
    for i, (st, data) in enumerate(zip(recipe.stages, datas)):
        folder = out / recipe.stage_dirname(i)
        if st.data.quality.reference_filter is not None:
            _filter_with_reference(recipe, i, data, run_dir, folder, tokenizer, echo)
        write_reports(folder, data)
        for line in summary_lines(data.report):
            echo(f"prefopt: {line}")
        echo(f"prefopt:   report and review sample: {folder}/")
    return out


def _filter_with_reference(recipe, i, data, run_dir: Path, folder: Path, tokenizer, echo) -> None:
    """Score stage i's rows with its reference: the base, or the previous stage's adapter when it is trained."""
    st = recipe.stages[i]
    use_base = i == 0 or st.type == "sft" or getattr(st, "reference", None) == "base"
    prev = run_dir / "stages" / recipe.stage_dirname(i - 1) / "adapter" if i else None
    if not use_base and not (prev / "adapter_config.json").is_file():
        data.report["reference_filter"] = {"status": "pending", "why": f"the reference is stage "
                                           f"{recipe.stages[i - 1].name}'s adapter, not trained yet; the filter runs "
                                           "when `prefopt run` starts this stage"}
        echo(f"prefopt: data {st.name}: reference filter pending ({recipe.stages[i - 1].name} is not trained yet)")
        return
    _, peft_model, _ = load_model(ModelSpec.of(recipe), adapter_config_from_section(recipe.adapter),
                                  adapter=None if use_base else prev)
    scores = apply_reference_filter(peft_model, tokenizer, st, data, use_base=use_base,
                                    max_length=trained_max_length(st), seed=recipe.seed)
    write_scores(folder, scores)
