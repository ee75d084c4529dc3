"""Research-script entry points: one stage on your own model and data."""

from __future__ import annotations

from pathlib import Path

from pydantic import TypeAdapter

from .config import PREFERENCE_TYPES, Stage


def train_stage(stage, model, tokenizer, train_dataset, eval_dataset=None, *, output_dir, seed: int = 42,
                report_to=()) -> dict:
    """Train `model` (a PeftModel) with one stage's TRL trainer; writes output_dir/adapter.

    `stage` is a stage section (prefopt.config.DPOStage, ...) or a dict such as
    {"name": "dpo", "type": "dpo", "data": {"path": "unused"}, "beta": 0.1}. Rows are normalised
    and checked as in a recipe (lists of dicts or `datasets.Dataset`). Returns the stage's metrics.
    """
    from datasets import Dataset

    from .data import StageData, normalise_preference, normalise_sft
    from .stages import STAGES

    if isinstance(stage, dict):
        stage = TypeAdapter(Stage).validate_python({"data": {"path": "<in memory>"}, **stage})
    normalise = normalise_preference if stage.type in PREFERENCE_TYPES else normalise_sft

    def prep(rows, label):
        if rows is None:
            return None, None
        rows = rows.to_list() if hasattr(rows, "to_list") else list(rows)
        out, fmt = normalise(rows, label)
        return Dataset.from_list(out), fmt

    train, fmt = prep(train_dataset, "train_dataset")
    ev, _ = prep(eval_dataset, "eval_dataset")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = StageData(train=train, eval=ev, fmt=fmt, files=[])
    return STAGES[stage.type](model, tokenizer, stage, data, out, seed=seed, report_to=list(report_to),
                              run_name=stage.name)
