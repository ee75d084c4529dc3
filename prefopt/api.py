"""The Python API: what `import prefopt` offers a research script (prefopt/__init__.py re-exports it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from .config import PREFERENCE_TYPES, AdapterSection, Recipe, Stage, defaults
from .data import StageData, normalise_preference, normalise_sft
from .merging.stream import merge_adapter
from .pipeline import RunResult
from .pipeline import run as _run
from .runs import folder as runfolder
from .stages import STAGES
from .steps.merge import merge_run

_ADAPTER = defaults(AdapterSection)


def run(recipe: Recipe, *, output_dir: str | Path | None = None, fresh: bool = False,
        echo: Callable[[str], Any] = print) -> RunResult:
    """Run a recipe's stages in order, then its evaluation and merge, in runs/<name>/ (or output_dir); a rerun
    resumes. Returns each stage's adapter and metrics (RunResult)."""
    return _run(recipe, output_dir=output_dir, fresh=fresh, echo=echo)


def merge(adapter_or_run_dir: str | Path, out_dir: str | Path | None = None, **kwargs: Any) -> dict:
    """Merge a run folder's final adapter (into RUN_DIR/merged unless out_dir), or an adapter folder (out_dir
    needed), into its base, DoRA magnitude included, and verify it; returns the merge report. kwargs: those of
    prefopt.merging.stream.merge_adapter (base, base_mode, out_dtype, overwrite, verify_merge, thresholds, ...)."""
    if (Path(adapter_or_run_dir) / runfolder.MANIFEST).is_file():
        return merge_run(adapter_or_run_dir, out_dir, **kwargs)
    return merge_adapter(adapter_or_run_dir, out_dir, **kwargs)


def train_stage(stage: Stage | dict, model, tokenizer, train_dataset, eval_dataset=None, *, output_dir: str | Path,
                seed: int = defaults(Recipe)["seed"], report_to: tuple[str, ...] | list[str] = ()) -> dict:
    """Train `model` (a PeftModel) with one stage's TRL trainer; writes output_dir/adapter.

    `stage` is a stage section (prefopt.config.DPOStage, ...) or a dict such as
    {"name": "dpo", "type": "dpo", "data": {"path": "unused"}, "beta": 0.1}. Rows are normalised
    and checked as in a recipe (lists of dicts or `datasets.Dataset`). Returns the stage's metrics.
    """
    from datasets import Dataset

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


def enable_fast_dora(peft_model, dropout: str = _ADAPTER["dora_dropout"]) -> int:
    """Route a PEFT model's DoRA layers through prefopt's exact low-rank forward; returns how many (see
    docs/dora.md). dropout: "lowrank" (on the low-rank branch; the default) or "full" (PEFT's semantics)."""
    from .dora import enable_fast_dora as enable  # (imports torch)

    return enable(peft_model, dropout)


def disable_fast_dora(peft_model) -> int:
    """Give a PEFT model's DoRA layers back to PEFT's own forward; returns how many."""
    from .dora import disable_fast_dora as disable  # (imports torch)

    return disable(peft_model)
