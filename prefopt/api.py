"""The Python API: what `import prefopt` offers a research script (prefopt/__init__.py re-exports it)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter

from . import console
from .config import (
    PREFERENCE_TYPES,
    UNPAIRED_TYPES,
    AdapterSection,
    Recipe,
    Stage,
    defaults,
    load_recipe,
    recipe_from_dict,
)
from .data import StageData, normalise_preference, normalise_sft, normalise_unpaired
from .errors import PrefoptError
from .memory import parse_size, recipe_memory_plan
from .merging.stream import merge_adapter
from .pipeline import RunResult
from .pipeline import run as _run
from .plan import make_plan
from .runs import folder as runfolder
from .runs.status import RunStatus, run_status
from .stages import STAGES
from .steps.adapters import load_adapter as _load_adapter
from .steps.evaluate import evaluate_existing
from .steps.merge import merge_run
from .sweep import SweepResult, SweepSpec, grid_values, parse_set_items, prepare, read_sweep_file, run_sweep

_ADAPTER = defaults(AdapterSection)
Echo = Callable[[str], Any]


def _recipe(recipe: str | Path | Recipe, overrides: Sequence[str] | dict[str, Any]) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            return recipe_from_dict(recipe.to_dict(), overrides if isinstance(overrides, dict) else list(overrides),
                                    base_dir=recipe.base_dir)
        return recipe
    return load_recipe(recipe, overrides if isinstance(overrides, dict) else list(overrides))


def _echo(quiet: bool, echo: Echo | None) -> Echo:
    if echo is not None:
        return echo
    return (lambda _line: None) if quiet else (lambda line: print(line, file=sys.stderr))


def run(recipe: str | Path | Recipe, *, output_dir: str | Path | None = None,
        overrides: Sequence[str] | dict[str, Any] = (), fresh: bool = False, quiet: bool = False,
        echo: Echo | None = None) -> RunResult:
    """Run a recipe: its stages in order (the same adapter carried along), then its evaluation and merge.

    Args:
        recipe (`str`, `Path` or `Recipe`):
            A recipe file, or a recipe loaded with `prefopt.load_recipe` / built with `prefopt.recipe_from_dict`.
        output_dir (`str` or `Path`, *optional*):
            The run folder; defaults to `runs/<name>/`. A rerun resumes: finished stages whose inputs are unchanged
            are kept, an interrupted one continues from its last checkpoint.
        overrides (sequence of `"key=value"` or a `dict`, *optional*):
            Recipe values to override, as `prefopt run --set` takes them, e.g. `["stages.dpo.beta=0.2", "seed=1"]`.
        fresh (`bool`, defaults to `False`):
            Start over: remove what prefopt wrote in the run folder first.
        quiet (`bool`, defaults to `False`):
            Say nothing (errors are raised).
        echo (`Callable[[str], Any]`, *optional*):
            Where prefopt's lines go (default: standard error; the training progress is said there too).

    Returns:
        `RunResult`: the run folder, each stage's adapter and metrics, the evaluation's verdict (`passed`,
        `gates`, `mmlu_delta`) and the merged model's folder.

    Raises:
        `prefopt.RecipeError` / `prefopt.DataError` (bad input, before any model loads), `prefopt.GateFailed`
        (an evaluation gate failed: the merge is refused).
    """
    say = _echo(quiet, echo)
    with console.speaking(say, quiet):
        return _run(_recipe(recipe, overrides), output_dir=output_dir, fresh=fresh, echo=say)


def sweep(recipe: str | Path, *, grid: dict[str, Sequence[Any]] | Sequence[str] = (),
          overrides: Sequence[str] | dict[str, Any] = (), select: str | None = None, max_points: int | None = None,
          output_dir: str | Path | None = None, quiet: bool = False, echo: Echo | None = None) -> SweepResult:
    """Run a recipe at every point of a grid, each point an ordinary run folder under runs/<name>-sweep/<point>/,
    and compare them (as `prefopt sweep`).

    Args:
        recipe (`str` or `Path`): a recipe file (its grid from `grid` and its `sweep:` section), or a sweep file
            (`recipe:`, `grid:`, `select:`, `max_points:`, `set:`).
        grid (`dict` or sequence of `"KEY=V1,V2"`): the values to try per recipe key, e.g.
            `{"stages.dpo.beta": [0.05, 0.1, 0.3], "adapter.r": [8, 16]}`; every combination is a point.
        overrides: recipe values fixed on every point, as `prefopt.run` takes them.
        select (`str`, *optional*): the metric that marks the best point, e.g. `"eval/rewards/accuracies:max"`
            (the last stage that logs it), `"dpo/eval/loss"`, `"mmlu_delta"` (default: the last stage's eval/loss, min).
        max_points (`int`, *optional*): refuse a larger grid (default 64).
        output_dir: the sweep folder (default runs/<name>-sweep/).
        quiet / echo: as for `prefopt.run`.

    Returns:
        `SweepResult`: `rows` (one dict per point: the overrides, `status`, `selected`, `best`, every stage's
        figures, `mmlu_delta`, `gates`, `trained` / `reused` stages, times), `best`, `csv` and `html`. A failed point
        is a row with status "failed" (its `error`); `result.check()` raises for one.

    Raises:
        `prefopt.RecipeError` (every problem of every point, before any point starts), `prefopt.RunFolderError`
        (a folder the sweep did not make).
    """
    spec = read_sweep_file(Path(recipe)) or SweepSpec(Path(recipe))
    spec.sets.update(overrides if isinstance(overrides, dict) else parse_set_items(list(overrides)))
    items = [grid] if isinstance(grid, str) else list(grid) if not isinstance(grid, dict) else []
    if isinstance(grid, dict):
        spec.grid = [*spec.grid, *[(str(k), grid_values(str(k), v)) for k, v in grid.items()]]
        spec.origin.update({str(k): "grid" for k in grid})
    say = _echo(quiet, echo)
    with console.speaking(say, quiet):
        prep = prepare(spec, grid=items, select=select, max_points=max_points, output_dir=output_dir)
        result = run_sweep(prep, echo=say)
        say(result.text())
        return result


@dataclass
class Plan:
    """What `prefopt.plan` returns: the plan as `prefopt plan` prints it, and the memory plan per stage."""

    text: str
    memory: dict | None

    @property
    def fits(self) -> bool | None:
        """Whether every stage fits the memory given (None when no memory was given or no plan could be made)."""
        if not self.memory or not self.memory.get("stages"):
            return None
        verdicts = [st["fits"] for st in self.memory["stages"]]
        return None if any(v is None for v in verdicts) else all(verdicts)


def plan(recipe: str | Path | Recipe, *, overrides: Sequence[str] | dict[str, Any] = (),
         gpu_memory: str | int | None = None, gpus: int = 1, device: Literal["cuda", "cpu"] = "cuda",
         sharding: Literal["none", "fsdp", "zero2"] = "none", output_dir: str | Path | None = None) -> Plan:
    """Check a recipe and plan its run without training: every problem, the data sizes after the data step's
    filters, trainable parameters and each stage's peak memory per device.

    Args:
        recipe (`str`, `Path` or `Recipe`): the recipe.
        overrides: as for `prefopt.run`.
        gpu_memory (`str` or `int`, *optional*): one device's memory ("24GB", "80GiB" or bytes) to check the plan
            against.
        gpus (`int`, defaults to 1): data-parallel devices.
        device (`"cuda"` or `"cpu"`): plan for a GPU (bf16 autocast) or for CPU training.
        sharding (`"none"`, `"fsdp"` or `"zero2"`): what the devices divide.
        output_dir: the run folder `prefopt.run` would write (checked for writing and space).

    Raises:
        `prefopt.RecipeError` / `prefopt.DataError`: the problems, every one named.
    """
    rec = _recipe(recipe, overrides)
    budget = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    text, memory = make_plan(rec, gpu_memory=budget, gpus=gpus, device=device, sharding=sharding,
                             output_dir=runfolder.run_dir_of(rec.name, output_dir))
    return Plan(text, memory)


def memory_plan(recipe: str | Path | Recipe, *, gpu_memory: str | int | None = None, gpus: int = 1,
                device: Literal["cuda", "cpu"] = "cuda", sharding: Literal["none", "fsdp", "zero2"] = "none") -> dict:
    """Only the memory plan of `prefopt.plan` (no data step): each stage's peak per device, by component."""
    budget = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    return recipe_memory_plan(_recipe(recipe, ()), gpu_memory=budget, gpus=gpus, device=device, sharding=sharding)


def evaluate(run_dir: str | Path, *, overrides: Sequence[str] | dict[str, Any] = (), quiet: bool = False,
             echo: Echo | None = None) -> dict:
    """(Re)run the evaluation of a finished run: held-out metrics, MMLU delta, completions and gates, with the run's
    recorded recipe (`overrides` change it, e.g. `["eval.mmlu.limit=50"]`).

    Returns:
        `dict`: the eval log (also in RUN_DIR/eval/eval_log.json): `passed`, `gates`, `mmlu`, `heldout`, ...

    Raises:
        `prefopt.GateFailed` when a gate fails (the log is written first).
    """
    ov = overrides if isinstance(overrides, dict) else list(overrides)
    return evaluate_existing(run_dir, ov, echo=_echo(quiet, echo))


def status(run_dir: str | Path) -> RunStatus:
    """What a run folder says about itself (as `prefopt status RUN_DIR`): each stage done / running / interrupted
    (resumable from step N) / failed / reused / not started, the evaluation's verdict and the merge's state.

    Raises:
        `prefopt.PrefoptError` when RUN_DIR is not a prefopt run folder.
    """
    return run_status(run_dir)


def merge(adapter_or_run_dir: str | Path, out_dir: str | Path | None = None, *, base: str | None = None,
          base_mode: Literal["auto", "dequantized", "original"] | None = None, out_dtype: str | None = None,
          overwrite: bool = False, verify_merge: bool = True, quiet: bool = False, echo: Echo | None = None,
          stage: str | None = None, **kwargs: Any) -> dict:
    """Merge an adapter into its base, DoRA magnitude included, streaming shard by shard, and verify that the
    merged model behaves like the adapter model.

    Args:
        adapter_or_run_dir (`str` or `Path`): a run folder (its final adapter; into RUN_DIR/merged unless
            `out_dir`) or a PEFT adapter folder (`out_dir` needed).
        out_dir: where the merged model goes.
        stage: a run folder's finished stage to merge instead of the final one (a roll-back; into
            RUN_DIR/merged-<stage> unless `out_dir`), with its own model card and lineage.json. The evaluation's
            gates judge the final adapter only: they do not block an earlier stage.
        base: the base model (an adapter folder only; default: as recorded beside the adapter).
        base_mode: merge into the weights as the quantized training base saw them ("dequantized"), the originals
            ("original"), or as the recipe says ("auto").
        out_dtype: the merged weights' dtype ("bfloat16", "float16", "float32").
        overwrite: replace an existing output folder.
        verify_merge: compare the merged model's logits with the adapter model's (on by default).
        kwargs: the rest of `prefopt.merging.stream.merge_adapter`'s options (thresholds, quantization, ...).

    Returns:
        `dict`: the merge report (also merged/merge_report.json), with the verification's figures.
    """
    kw = {k: v for k, v in dict(base_mode=base_mode, out_dtype=out_dtype).items() if v is not None}
    kw.update(kwargs, overwrite=overwrite, verify_merge=verify_merge, echo=_echo(quiet, echo))
    if (Path(adapter_or_run_dir) / runfolder.MANIFEST).is_file():
        if base is not None:
            raise ValueError("base= goes with an adapter folder; a run folder records its base")
        return merge_run(adapter_or_run_dir, out_dir, stage=stage, **kw)
    if stage is not None:
        raise PrefoptError(f"{adapter_or_run_dir}: stage= goes with a run folder, and this one has no "
                           f"{runfolder.MANIFEST}; give the folder a run wrote (runs/<recipe name>)")
    return merge_adapter(adapter_or_run_dir, out_dir, base=base, **kw)


def load_adapter(run_dir: str | Path, stage: str | None = None, *, with_tokenizer: bool = False):
    """A run's finished adapter on its base, ready for inference: loaded as the run loaded it for its evaluation
    (the base as recipe.yaml says: quantization, dtype, DoRA forward; a pissa/olora base rewritten as in training).

    Args:
        run_dir (`str` or `Path`): the run folder (runs/<recipe name>).
        stage: the finished stage whose adapter to load (default: the last stage).
        with_tokenizer: also return the tokenizer the run used (the one saved in the adapter folder, chat
            template included, holds the same: `AutoTokenizer.from_pretrained(<run>/stages/NN-<stage>/adapter)`).

    Returns:
        `peft.PeftModel` in eval mode, or `(model, tokenizer)` with `with_tokenizer=True`.

    Raises:
        `PrefoptError`: not a run folder, no such stage, or the stage is not finished (the message names the
            stages there are).
    """
    return _load_adapter(run_dir, stage, with_tokenizer=with_tokenizer)


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
    normalise = normalise_preference if stage.type in PREFERENCE_TYPES else \
        normalise_unpaired if stage.type in UNPAIRED_TYPES else normalise_sft

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
