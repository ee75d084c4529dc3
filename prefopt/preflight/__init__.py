"""Every problem that can be found before a model loads, all at once, each with its key path and YAML line.

`preflight(recipe)` is what `prefopt plan` and the start of `prefopt run` call. It reads the model's config and
tokenizer (never its weights), builds each stage's TRL config as the stage will, loads and checks the data, and
returns the data the stages then train on (so what was checked is what is trained on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..advice import metric_key, stage_metrics
from ..config import Recipe, load_recipe
from ..data import data_problem, stage_data
from ..dist import launcher_problems
from ..errors import DataError, RecipeError
from ..stages import CHECKS
from .env import check_completion_prompts, check_eval, check_output, check_wandb
from .model import check_hub, check_model
from .trl import build_trl_config, check_kwarg_types, check_schedule, check_train_names

__all__ = ["Checked", "build_trl_config", "check_hub", "check_model", "check_train_names", "load_checked",
           "preflight"]


@dataclass
class Checked:
    """What preflight found: each stage's data after the data step (filtered, split, with its report) and notes."""

    data: list = field(default_factory=list)  # StageData per stage
    warnings: list = field(default_factory=list)


def preflight(recipe: Recipe, *, echo=None, output_dir: str | Path | None = None) -> Checked:
    """Every problem, all at once (RecipeError). `output_dir`: the run folder the run will write (checked for
    writability and free space); None checks nothing on disk."""
    problems: list[str] = []
    checked = Checked()
    checked.warnings += check_hub(recipe)  # first: an unreachable hub makes the rest work from the local cache
    configs = []
    for i, st in enumerate(recipe.stages):
        problems += [_located(recipe, p) for p in CHECKS[st.type](st, f"stages[{i}]")]
        named = check_train_names(recipe, i)
        typed = check_kwarg_types(recipe, i)
        cfg, probs = build_trl_config(recipe, i) if not named else (None, [])
        configs.append(None if typed else cfg)  # a config holding a wrong-typed value checks nothing further
        problems += named + typed + probs
    problems += check_wandb(recipe)
    problems += check_eval(recipe)
    problems += launcher_problems(quantization=recipe.model.quantization, quant_storage=recipe.model.quant_storage,
                                  quant_key=recipe.locate("model", "quantization"),
                                  storage_key=recipe.locate("model", "quant_storage"))
    model_problems, tokenizer = check_model(recipe)
    problems += model_problems
    if output_dir is not None:
        problems += check_output(recipe, Path(output_dir), model_ok=not model_problems)

    for i in range(len(recipe.stages)):
        try:
            data = stage_data(recipe, i, tokenizer)
        except DataError as e:
            problems.append(data_problem(recipe, i, e))
            checked.data.append(None)
            continue
        checked.data.append(data)
        if configs[i] is not None and len(data.train):
            problems += check_schedule(recipe, i, configs[i], len(data.train))
        problems += check_early_stopping(recipe, i, data)
    if checked.data and checked.data[-1] is not None:
        problems += check_completion_prompts(recipe, checked.data[-1])
    if problems:
        raise RecipeError(problems, recipe.source)
    for w in checked.warnings:
        (echo or (lambda s: None))(f"prefopt: warning: {w}")
    return checked


def check_early_stopping(recipe: Recipe, i: int, data) -> list[str]:
    """train.early_stopping asked for: a metric the stage logs, held-out rows to watch it on, and an evaluation
    before max_steps ends the stage."""
    st = recipe.stages[i]
    es = st.train.early_stopping
    if es is None or es == "auto":
        return []
    problems = []
    known = stage_metrics(st)
    if es.metric.removeprefix("eval_") not in known:
        problems.append(f"{recipe.locate('stages', i, 'train', 'early_stopping', 'metric')}: a {st.type} stage "
                        f"logs no held-out '{es.metric}'; one of {', '.join(metric_key(m) for m in known)}")
    if data.eval is None or not len(data.eval):
        problems.append(f"{recipe.locate('stages', i, 'train', 'early_stopping')}: the stage holds out no rows to "
                        "watch the metric on; set data.eval_fraction or data.eval_path, or early_stopping: null")
    if st.train.max_steps > 0 and not st.train.eval_steps:
        problems.append(f"{recipe.locate('stages', i, 'train', 'early_stopping')}: with max_steps the stage may end "
                        "before its first epoch's evaluation; set train.eval_steps (evaluate every N steps)")
    return problems


def load_checked(path, overrides=None) -> Recipe:
    """load_recipe, except that a recipe with schema problems is also checked further (its bad values left out):
    one report lists every problem -- the schema's, the files', the names', the TRL configs' -- not one kind per
    attempt. A recipe without schema problems is returned as loaded (preflight then runs as usual)."""
    try:
        return load_recipe(path, overrides)
    except RecipeError as e:
        if e.repaired is None:
            raise
        problems = list(e.problems)
        try:
            preflight(e.repaired)
        except RecipeError as more:
            seen = {_key_of(p) for p in problems}
            # the same problem again, or again for the section holding it (a missing file: path and data)
            problems += [p for p in more.problems
                         if not any(k == _key_of(p) or k.startswith(_key_of(p) + ".") for k in seen)]
        raise RecipeError(problems, e.source) from None


def _key_of(problem: str) -> str:
    return problem.split(":", 1)[0].split(" (", 1)[0]


_STAGE_KEY = re.compile(r"^stages\[(\d+)\]((?:\.[\w-]+|\[\d+\])*): ")


def _located(recipe: Recipe, problem: str) -> str:
    """A stage module's 'stages[1].trainer_kwargs.foo: ...' with its YAML line (or --set) added."""
    m = _STAGE_KEY.match(problem)
    if not m:
        return problem
    keys = tuple(int(k[1:-1]) if k.startswith("[") else k for k in re.findall(r"\[\d+\]|[\w-]+", m.group(2)))
    return f"{recipe.locate('stages', int(m.group(1)), *keys)}: {problem[m.end():]}"


# ---------------------------------------------------------------------------------------------- names and types


# ---------------------------------------------------------------------------------------------- tracking


# ---------------------------------------------------------------------------------------------- eval


# ---------------------------------------------------------------------------------------------- model


# ---------------------------------------------------------------------------------------------- the run folder


# ---------------------------------------------------------------------------------------------- data-dependent


__all__ = ["Checked", "preflight"]
