"""`run(recipe)`: a run from top to bottom. It calls the steps (prefopt.steps); it computes nothing itself.

recipe -> preflight (every problem before a model loads; the data step) -> stages in order -> evaluation -> merge
-> report. The run folder's layout: prefopt.runs.folder. Nothing is written to it until new work is committed
(prefopt.runs.records): a run that fails before leaves it byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import dist
from .config import Recipe
from .data.report import summary_lines
from .errors import GateFailed
from .plan import header_lines
from .preflight import preflight
from .report import write_report
from .runs import folder as runfolder
from .runs import records as run_records
from .steps.evaluate import evaluate_step
from .steps.merge import merge_step
from .steps.train import StageResult, run_stages


@dataclass
class RunResult:
    """What `prefopt.run` returns: the run folder, each stage's adapter and metrics (in recipe order), the
    evaluation's log and verdict, and the merge's report and folder."""

    run_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    merge_report: dict | None = None
    eval_log: dict | None = None

    @property
    def final_adapter(self) -> Path | None:
        return self.stages[-1].adapter if self.stages else None

    @property
    def adapters(self) -> dict[str, Path]:
        return {s.name: s.adapter for s in self.stages}

    @property
    def metrics(self) -> dict[str, dict]:
        return {s.name: s.metrics for s in self.stages}

    @property
    def merged(self) -> Path | None:
        """The merged model's folder (None when the recipe merges nothing)."""
        return self.run_dir / runfolder.MERGED if self.merge_report is not None else None

    @property
    def passed(self) -> bool | None:
        """The evaluation's verdict: True when every gate passed, False when one failed, None without evaluation."""
        return None if self.eval_log is None else bool(self.eval_log.get("passed"))

    @property
    def gates(self) -> list[dict]:
        """Each gate: name, what, value, limit, verdict ("pass" / "fail")."""
        return list((self.eval_log or {}).get("gates", []))

    @property
    def mmlu_delta(self) -> tuple[float, float] | None:
        """(tuned - base MMLU accuracy in points, its paired standard error), when MMLU was evaluated."""
        m = (self.eval_log or {}).get("mmlu")
        return (m["delta_points"], m["paired_stderr"]) if m else None

    @property
    def eval_log_path(self) -> Path | None:
        return self.run_dir / runfolder.EVAL / runfolder.EVAL_LOG if self.eval_log is not None else None


def run(recipe: Recipe, *, output_dir: str | Path | None = None, fresh: bool = False, echo=print,
        sweep: dict | None = None) -> RunResult:
    """Run the recipe's stages in order, then its evaluation and merge; returns each stage's adapter and metrics.
    `sweep`: the point of a sweep this run is (its folder, overrides), recorded in run.json."""
    run_records.forget_committed()
    dist.init()  # under torchrun / accelerate launch: the process group; only the main process writes and speaks
    echo = echo if dist.is_main() else _silent
    run_dir = runfolder.run_dir_of(recipe.name, output_dir)
    runfolder.check_output_dir(run_dir, recipe_name=recipe.name, stages=[(s.name, s.type) for s in recipe.stages],
                               fresh=fresh)
    recipe = runfolder.self_contained(recipe)  # the recipe the run folder records: absolute paths, data hashes
    for line in header_lines(recipe, run_dir):
        echo(line)
    checked = preflight(recipe, echo=echo, output_dir=run_dir)
    records = run_records.Records.open(recipe, run_dir, fresh, echo)
    if sweep is not None:
        records.manifest["sweep"] = sweep
    for line in _data_lines(checked.data):
        echo(f"prefopt: {line}")

    result = RunResult(run_dir, run_stages(recipe, run_dir, checked.data, records, fresh=fresh, echo=echo))
    records.save()
    finished = False
    try:
        result.eval_log = evaluate_step(recipe, run_dir, records, checked.data, echo)
        result.merge_report = merge_step(recipe, run_dir, records, echo)
        finished = True
    except GateFailed:
        finished = True  # a new evaluation's verdict: it is recorded (the report shows a run stopped by a gate too)
        raise
    finally:
        _close(records, run_dir, finished, echo)
    return result


def _data_lines(data: list) -> list[str]:
    return [line for d in data for line in summary_lines(d.report)]


def _close(records, run_dir: Path, finished: bool, echo) -> None:
    """The records describe the folder (written only where they changed), and the report is rebuilt when anything
    was written. No rank exits (and has the launcher stop the others) before the main process is done."""
    if dist.is_main():
        if finished:
            records.commit()
        if records.changed:
            write_report(run_dir, echo)
    dist.barrier()


def _silent(_line: str) -> None:
    """The echo of every process but the main one (one console, not one per rank)."""
