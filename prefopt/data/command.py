"""`prefopt data RECIPE`: the data step of every stage, without training, into runs/<name>/data/.

No model is loaded (only the tokenizer, for the token checks) unless a stage asks for the reference-model filter:
then the base is loaded once, with the previous stage's adapter from the run folder when that stage is done (a
stage whose reference is not trained yet is reported as pending: its filter runs when `prefopt run` starts it).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from ..errors import DataError, RecipeError
from .report import summary_lines, write_reports


def run_data_step(recipe, *, output_dir=None, echo=print) -> Path:
    from ..runs import folder as runfolder
    from ..preflight import build_trl_config, check_model, check_train_names
    from . import data_problem, evaluation_sets, trained_max_length
    from .prepare import prepare_stage

    run_dir = Path(output_dir) if output_dir else Path("runs") / recipe.name
    runfolder.check_output_dir(run_dir, recipe_name=recipe.name, stages=[(s.name, s.type) for s in recipe.stages],
                               fresh=False)
    recipe = runfolder.self_contained(recipe)
    problems, tokenizer = check_model(recipe)
    datas = []
    for i, st in enumerate(recipe.stages):
        if not check_train_names(recipe, i):
            problems += build_trl_config(recipe, i)[1]
        try:
            datas.append(prepare_stage(st, seed=recipe.seed, base_dir=recipe._base_dir, tokenizer=tokenizer,
                                       max_length=trained_max_length(st),
                                       extra_decontaminate=evaluation_sets(recipe)))
        except DataError as e:
            problems.append(data_problem(recipe, i, e))
    if problems:
        raise RecipeError(problems, recipe._source)

    out = run_dir / runfolder.DATA
    out.mkdir(parents=True, exist_ok=True)
    runfolder.write_atomic(out / runfolder.DATA_MANIFEST, json.dumps(
        {"recipe_name": recipe.name, "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
         "stages": [recipe.stage_dirname(i) for i in range(len(recipe.stages))]}, indent=2))
    model = None
    for i, (st, data) in enumerate(zip(recipe.stages, datas)):
        folder = out / recipe.stage_dirname(i)
        if st.data.quality.reference_filter is not None:
            model = _reference_filter(recipe, i, data, run_dir, folder, model, tokenizer, echo)
        write_reports(folder, data)
        for line in summary_lines(data.report):
            echo(f"prefopt: {line}")
        echo(f"prefopt:   report and review sample: {folder}/")
    return out


def _reference_filter(recipe, i, data, run_dir: Path, folder: Path, model, tokenizer, echo):
    """Score with the stage's reference; returns the loaded base (kept for the next stage)."""
    from ..models import adapter_config_from_section, attach_adapter, load_base_model
    from . import trained_max_length
    from .reference import apply_reference_filter, write_scores

    st = recipe.stages[i]
    use_base = i == 0 or st.type == "sft" or getattr(st, "reference", None) == "base"
    prev = run_dir / "stages" / recipe.stage_dirname(i - 1) / "adapter" if i else None
    if not use_base and not (prev / "adapter_config.json").is_file():
        data.report["reference_filter"] = {"status": "pending", "why": f"the reference is stage "
                                           f"{recipe.stages[i - 1].name}'s adapter, not trained yet; the filter runs "
                                           "when `prefopt run` starts this stage"}
        echo(f"prefopt: data {st.name}: reference filter pending ({recipe.stages[i - 1].name} is not trained yet)")
        return model
    m, a = recipe.model, recipe.adapter
    base = load_base_model(recipe.model_path(), quantization=m.quantization, dtype=m.dtype, revision=m.revision,
                           trust_remote_code=m.trust_remote_code)
    peft_model = attach_adapter(base, adapter_config_from_section(a), init_from=None if use_base else prev,
                                dora_impl=a.dora_impl, dora_dropout=a.dora_dropout)
    scores = apply_reference_filter(peft_model, tokenizer, st, data, use_base=use_base,
                                    max_length=trained_max_length(st), seed=recipe.seed)
    write_scores(folder, scores)
    return None


__all__ = ["run_data_step"]
