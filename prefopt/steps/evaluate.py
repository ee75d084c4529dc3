"""The evaluation step of a run (after the last stage, before the merge) and `prefopt eval RUN_DIR`: the eval
section's figures and the gates (GateFailed, exit 3). It computes nothing itself (prefopt.eval does)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .. import dist, tracking
from ..config import Recipe, load_recipe
from ..errors import GateFailed, PrefoptError
from ..eval.run import StageEval, describe, evaluate_run, judge_again
from ..models import ModelSpec
from ..preflight import preflight
from ..report import write_report
from ..runs import folder as runfolder
from ..runs.folder import adapter_hash, read_manifest, write_atomic


def evaluate_step(recipe: Recipe, run_dir: Path, records, data: list, echo) -> dict | None:
    """The recipe's eval section, on the main process (the others wait for it); None when it has none."""
    if recipe.eval is None:
        return None
    if dist.world_size() > 1:
        # lm-eval and generation issue collectives of their own under a launcher, which the waiting ranks would
        # answer with the wrong ones: the main process evaluates in a process of its own (`prefopt eval`)
        records.commit()  # the evaluating process reads this run's recipe.yaml and run.json: they must be current
        return dist.on_main_then_share(evaluate_in_own_process, run_dir, records.manifest, echo)
    return dist.on_main_then_share(evaluate_final, recipe, run_dir, records.manifest, data, records.save, echo)


def eval_inputs(recipe: Recipe, manifest: dict, run_dir: Path) -> str:
    """What an evaluation's figures depend on: the eval section (its gates aside: they only judge the figures),
    every stage's inputs and the adapters it reads."""
    ev = recipe.eval
    stages = manifest["stages"] if ev.after == "every_stage" else manifest["stages"][-1:]
    local = [p for p in ((ev.mmlu.path if ev.mmlu else None), ev.completions.prompts) if p]
    return recipe.section_hash(ev.model_dump(mode="json", exclude={"gates"}),
                               [runfolder.content_hash(p) for p in local],
                               [s["inputs_hash"] for s in manifest["stages"]],
                               [adapter_hash(run_dir / s["adapter"]) for s in stages])


def evaluate_final(recipe: Recipe, run_dir: Path, manifest: dict, data: list, save_manifest, echo,
                   force: bool = False, withdraw_merged: bool = True) -> dict:
    """The recipe's eval section after the last stage, before the merge. A failed gate stops the run (GateFailed,
    exit code 3), recorded in eval_log.json and run.json; an unchanged evaluation is not redone."""
    key = eval_inputs(recipe, manifest, run_dir)
    log = runfolder.read_eval_log(run_dir)
    if not force and log is not None and log.get("inputs_hash") == key and (manifest.get("eval") or {}).get(
            "inputs_hash") == key:
        log, changed = judge_again(run_dir, recipe.eval.gates, [(s.name, s.type) for s in recipe.stages])
        manifest["eval"].update(passed=log["passed"], gates_failed=[g["name"] for g in runfolder.failed_gates(log)])
        save_manifest(commit=changed)  # new gates judged the figures: a new verdict to record
        echo(f"prefopt: eval: figures unchanged, not evaluated again; {describe(log)}")
    else:
        manifest["eval"] = {"status": "running", "inputs_hash": key, "path": f"{runfolder.EVAL}/{runfolder.EVAL_LOG}"}
        save_manifest()
        spec = ModelSpec.of(recipe)
        stages = [StageEval(name=e["name"], type=e["type"], adapter=run_dir / e["adapter"],
                            eval_rows=d.eval.to_list() if d.eval is not None else [], metrics=e.get("metrics") or {},
                            files=list(d.files), train_rows=len(d.train))
                  for e, d in zip(manifest["stages"], data)]
        try:
            seed = recipe.seed if recipe.eval.seed is None else recipe.eval.seed
            log = evaluate_run(run_dir, cfg=recipe.eval, spec=spec, stages=stages, seed=seed, run_id=manifest["run_id"],
                               recipe_hash=manifest["recipe_hash"], config=recipe.to_dict(), inputs_hash=key,
                               adapter_hash=adapter_hash(stages[-1].adapter),
                               wandb=recipe.tracking.wandb, echo=echo,
                               group=tracking.group_of(recipe.tracking.wandb, recipe.name, manifest["run_id"]))
        except BaseException:
            manifest["eval"]["status"] = "failed"
            save_manifest()
            raise
        failed = runfolder.failed_gates(log)
        manifest["eval"].update(status="done", passed=log["passed"], gates_failed=[g["name"] for g in failed])
        save_manifest(commit=True)  # a new evaluation is new work
        echo(f"prefopt: eval: {describe(log)}")
    if not log.get("passed"):
        merged = run_dir / runfolder.MERGED
        if merged.exists() and withdraw_merged:
            # an earlier merge of a model that now fails a gate must not sit there as the run's result
            shutil.rmtree(merged)
            manifest.pop("merge", None)
            save_manifest(commit=True)
            echo(f"prefopt: eval: removed {merged}, an earlier merge; the model fails a gate now")
        elif merged.exists():
            echo(f"prefopt: eval: warning: {merged} holds an earlier merge of a model that fails a gate now")
        raise GateFailed(f"{runfolder.gate_line(runfolder.failed_gates(log))}; the run stops before the merge "
                         f"(see {run_dir / runfolder.EVAL / runfolder.EVAL_LOG})")
    return log


def evaluate_in_own_process(run_dir: Path, manifest: dict, echo) -> dict:
    """The recipe's evaluation under a launcher: `prefopt eval RUN_DIR --in-run` as a process of its own (the others
    wait), then its outcome read back into this run's manifest; a failed gate is GateFailed here too."""

    echo(f"prefopt: eval: in a process of its own (lm-eval and generation are single-process): prefopt eval {run_dir}")
    code = dist.run_alone(["eval", str(run_dir), "--in-run"])
    written = read_manifest(run_dir) or {}  # by the child: its evaluation, and a merge it may have withdrawn
    for key in ("eval", "merge"):
        if key in written:
            manifest[key] = written[key]
        else:
            manifest.pop(key, None)
    log = runfolder.read_eval_log(run_dir)
    if code == GateFailed.exit_code and log is not None:
        err = GateFailed(f"{runfolder.gate_line(runfolder.failed_gates(log))}; the run stops before the merge (see "
                         f"{run_dir / runfolder.EVAL / runfolder.EVAL_LOG})")
        err.said = True  # by the evaluating process, in these words
        raise err
    if code != 0 or log is None:
        raise PrefoptError(f"eval: `prefopt eval {run_dir}` failed (exit code {code}, see above); the stages are "
                           f"done: run it again, alone, when fixed")
    return log


def evaluate_existing(run_dir: str | Path, overrides=None, echo=print, in_run: bool = False) -> dict:
    """`prefopt eval RUN_DIR`: (re)run the evaluation of a finished run, with its recorded recipe (its eval
    section, or the defaults when it has none). Raises GateFailed when a gate fails."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None or not (run_dir / runfolder.RECIPE).is_file():
        raise PrefoptError(f"{run_dir}: not a prefopt run folder (no run.json / recipe.yaml)")
    raw_eval = (yaml.safe_load((run_dir / runfolder.RECIPE).read_text()) or {}).get("eval")
    ov = list(overrides or [])
    if raw_eval is None:
        ov = ["eval={}"] + ov
    recipe = load_recipe(run_dir / runfolder.RECIPE, ov)
    unfinished = [s["name"] for s in manifest.get("stages", []) if s.get("status") != "done"]
    if unfinished or len(manifest.get("stages", [])) != len(recipe.stages):
        raise PrefoptError(f"{run_dir}: stages not finished ({', '.join(unfinished) or 'the recipe changed'}); "
                           f"finish the run first (prefopt run {run_dir / runfolder.RECIPE})")
    recipe = runfolder.self_contained(recipe)  # a path given with --set: absolute from here on
    data = preflight(recipe, echo=echo).data

    def save_manifest(commit: bool = False):  # `prefopt eval` was asked to write: every save writes
        write_atomic(run_dir / "run.json", json.dumps(manifest, indent=2))

    try:
        # in_run: the run's own evaluation (a launcher's main process asked): an unchanged one is not redone
        return evaluate_final(recipe, run_dir, manifest, data, save_manifest, echo, force=not in_run,
                              withdraw_merged=in_run)
    finally:
        if not in_run:  # the run writes its report when it ends
            write_report(run_dir, echo)
