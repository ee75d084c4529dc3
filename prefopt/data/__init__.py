"""The data step: read sources, normalise formats, filter, split, report (see prepare.py for the order).

Public:
- prepare_stage(stage, seed=..., tokenizer=..., max_length=...) -> StageData (rows + report + review sample)
- load_stage_data(stage, seed=...): the same without a tokenizer (text-level filters only)
- check_recipe_data(recipe): every stage's data problems at once (RecipeError)
- normalise_sft / normalise_preference: rows handed in code, strictly (a row that cannot train is an error)
"""

from __future__ import annotations

from ..config import looks_local
from ..errors import DataError, RecipeError
from ..models import load_tokenizer
from ..runs.folder import file_hash, sha256_of
from .formats import normalise_preference, normalise_rows, normalise_sft, normalise_unpaired
from .prepare import REASONS, StageData, fingerprint, prepare_stage
from .sources import read_rows


def load_stage_data(stage, *, seed: int, base_dir=None) -> StageData:
    """Read, check, normalise, filter and split one stage's data (no tokenizer: the token checks are left out, so
    the split can differ from a run's; use recipe_stage_data for the rows a run trained and evaluated on)."""
    return prepare_stage(stage, seed=seed, base_dir=base_dir)


def trained_max_length(stage) -> int | None:
    """The length the data step checks rows against: the stage's effective max_length, or None when nothing is
    cut from the start's side (DPO's keep_end truncation keeps every answer's end)."""
    if stage.trainer_kwargs.get("truncation_mode") == "keep_end":
        return None
    return stage.effective_max_length()


def evaluation_sets(recipe) -> list[str]:
    """The local evaluation data the recipe evaluates on (eval.mmlu.path as a folder): every stage's rows are
    decontaminated against it too. A hub id is not fetched for this (name it in quality.decontaminate)."""
    ev = getattr(recipe, "eval", None)
    if ev is None or ev.mmlu is None or not looks_local(ev.mmlu.path):
        return []
    rp = recipe.resolve(ev.mmlu.path)
    return [str(rp)] if rp is not None and rp.is_dir() else []


def recipe_stage_data(recipe, i: int, tokenizer=None) -> StageData:
    """Stage i's data exactly as `prefopt run` prepares it (the model's tokenizer, the trained max_length), so the
    held-out rows are the ones the run held out. Loads the tokenizer when none is given."""
    if tokenizer is None:
        m = recipe.model
        tokenizer = load_tokenizer(recipe.model_path(), chat_template=m.chat_template, revision=m.revision,
                                   trust_remote_code=m.trust_remote_code)
    return stage_data(recipe, i, tokenizer)


def stage_data(recipe, i: int, tokenizer) -> StageData:
    """Stage i's data as a run prepares it, with this tokenizer (None: the token checks are left out)."""
    st = recipe.stages[i]
    return prepare_stage(st, seed=recipe.seed, base_dir=recipe.base_dir, tokenizer=tokenizer,
                         max_length=trained_max_length(st), extra_decontaminate=evaluation_sets(recipe))


def data_problem(recipe, i: int, e: DataError) -> str:
    """A stage's data error with its key path and line: stages[i].data (line N) or stages[i].data.<key>."""
    if e.key and e.key.startswith("stage:"):  # a key of the stage, outside its data section
        return f"{recipe.locate('stages', i, *_key_path(e.key.removeprefix('stage:')))}: {e}"
    if e.key:
        return f"{recipe.locate('stages', i, 'data', *_key_path(e.key))}: {e}"
    return f"stages[{i}].data{recipe.line_of('stages', i, 'data', 'path', exact=True)}: {e}"


def _key_path(key: str) -> tuple:
    """'path[1].sha256' -> ('path', 1, 'sha256')."""
    out = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        out.append(name)
        if rest:
            out.append(int(rest.rstrip("]")))
    return tuple(out)


def check_recipe_data(recipe) -> None:
    """Every stage's data problems, all at once (RecipeError), before any training starts."""
    problems = []
    for i, st in enumerate(recipe.stages):
        try:
            load_stage_data(st, seed=recipe.seed, base_dir=recipe.base_dir)
        except DataError as e:
            problems.append(data_problem(recipe, i, e))
    if problems:
        raise RecipeError(problems, recipe.source)


__all__ = ["REASONS", "StageData", "check_recipe_data", "data_problem", "file_hash", "fingerprint", "load_stage_data",
           "normalise_preference", "normalise_rows", "normalise_sft", "normalise_unpaired", "prepare_stage",
           "read_rows", "evaluation_sets", "recipe_stage_data", "stage_data", "sha256_of", "trained_max_length"]
