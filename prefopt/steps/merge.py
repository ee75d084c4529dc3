"""The merge step of a run (the recipe's merge section, after the evaluation) and `prefopt merge RUN_DIR`: the
final adapter merged into its base and verified (prefopt.merging does the work), its model card written."""

from __future__ import annotations

from pathlib import Path

from .. import dist
from ..config import Recipe, identity, load_recipe
from ..data import recipe_stage_data
from ..errors import GateFailed, MergeError, PrefoptError, option
from ..eval.card import write_model_card
from ..merging.stream import Thresholds, merge_adapter
from ..models import BASE_INFO
from ..preflight.env import check_wandb
from ..runs import folder as runfolder
from ..runs.folder import adapter_hash, failed_gates, gate_line, read_eval_log
from ..runs.lineage import read_lineage
from .adapters import finished_stage
from .lineage import log_merge, record_merge


def merge_step(recipe: Recipe, run_dir: Path, records, echo) -> dict | None:
    """The recipe's merge section, on the main process (the others wait for it); None when it has none."""
    if recipe.merge is None:
        return None
    return dist.on_main_then_share(merge_final, recipe, run_dir, records.manifest, records.save, echo)


def merge_final(recipe: Recipe, run_dir: Path, manifest: dict, save_manifest, echo) -> dict:
    """The recipe's merge section: merge the last adapter into runs/<name>/merged/ (redone when it changed)."""
    mc = recipe.merge
    out = run_dir / runfolder.MERGED
    # the merge's inputs: its section, the last stage's inputs and the adapter that stage actually wrote
    final = run_dir / manifest["stages"][-1]["adapter"]
    key = recipe.section_hash(identity("merge", mc.model_dump(mode="json")), manifest["stages"][-1]["inputs_hash"],
                              adapter_hash(final))
    report = runfolder.merge_done(run_dir, manifest, key, verify=mc.verify)
    if report is not None:
        echo("prefopt: merge: done and unchanged, skipped")
        if runfolder.read_eval_log(run_dir) is not None:  # the evaluation or its reviews may be newer
            write_model_card(out, run_dir)
        return report
    thresholds = Thresholds.of(mc)
    manifest["merge"] = {"status": "running", "path": "merged", "inputs_hash": key}
    save_manifest()
    try:
        report = merge_run(run_dir, out, base_mode=mc.base, out_dtype=mc.dtype, overwrite=True,
                           verify_merge=mc.verify, thresholds=thresholds, echo=echo, recipe=recipe,
                           peft_forward=None if mc.peft_forward == "auto" else mc.peft_forward,
                           report_extra={"inputs_hash": key})
    except BaseException:
        manifest["merge"]["status"] = "failed"
        save_manifest()
        raise
    manifest["merge"].update(status="done", verification=report.get("verification"), lineage=read_lineage(out))
    save_manifest(commit=True)
    return report


def merge_run(run_dir: str | Path, out_dir: str | Path | None = None, *, recipe=None, ignore_gates: bool = False,
              stage: str | None = None, echo=print, **kwargs) -> dict:
    """Merge a run folder's final adapter or, with `stage`, that finished stage's (a roll-back; into
    RUN_DIR/merged-<stage>/ unless out_dir). Probes are that stage's held-out rows. The evaluation's gates judge the
    adapter it evaluated, the final one: a run whose evaluation failed a gate is refused (GateFailed) unless
    ignore_gates, and an earlier stage's adapter is not judged by them. The merged folder gets its lineage.json and,
    for a stage or with an eval log, its model card (README.md); with tracking on, a W&B model artifact."""
    run_dir = Path(run_dir)
    manifest, index, entry = finished_stage(run_dir, stage, error=MergeError)
    adapter_dir = run_dir / entry["adapter"]
    log = read_eval_log(run_dir)
    if log is not None and log.get("adapter_hash") != adapter_hash(adapter_dir):
        log = None  # an evaluation of another adapter (an earlier one, or the final stage's) says nothing about it
    if failed_gates(log) and not ignore_gates:
        raise GateFailed(f"{run_dir}: {gate_line(failed_gates(log))}; refusing to merge "
                         f"(pass {option('ignore_gates')} to merge anyway, or {option('stage', 'NAME')} to merge an "
                         "earlier stage's adapter)")
    if "probe_rows" not in kwargs:
        recipe = _probes(run_dir, recipe, entry["name"], kwargs)
    if recipe is not None and recipe.adapter.method == "dora":
        kwargs.setdefault("dora_impl", recipe.adapter.dora_impl)
        kwargs.setdefault("dora_dropout", recipe.adapter.dora_dropout)
    if not (adapter_dir / BASE_INFO).is_file():  # older run folders: the recipe says how the base was loaded
        recipe = recipe or load_recipe(run_dir / "recipe.yaml")
        kwargs.setdefault("base", recipe.model_path())
        kwargs.setdefault("quantization", recipe.model.quantization)
        kwargs.setdefault("dtype", recipe.model.dtype)
    out = Path(out_dir) if out_dir else run_dir / (runfolder.MERGED if stage is None else
                                                   f"{runfolder.MERGED}-{entry['name']}")
    report = merge_adapter(adapter_dir, out, echo=echo, **kwargs)
    # a merge is written into a new folder, never with a lineage.json: one there means the folder was current
    record = read_lineage(out)
    fresh = not (record and record.get("adapter_hash") == report.get("adapter_hash"))
    if fresh:
        record = record_merge(run_dir, manifest, index, out, report)
    if log is not None or stage is not None:
        write_model_card(out, run_dir, stage=entry["name"] if stage is not None else None)
    if fresh:
        _log_merge(recipe, run_dir, manifest, entry, out, record, rollback=stage is not None, echo=echo)
    return report


def _probes(run_dir: Path, recipe, stage: str, kwargs: dict):
    """The stage's held-out rows as the verification's probes (kwargs probe_rows, probe_note); returns the recipe
    (loaded from the run folder when not given, None when it cannot be read)."""
    kwargs["probe_rows"], kwargs["probe_note"] = None, None
    try:
        recipe = recipe or load_recipe(run_dir / "recipe.yaml")
        names = [s.name for s in recipe.stages]
        if stage not in names:
            kwargs["probe_note"] = f"the recipe in {run_dir} no longer has the stage '{stage}'"
            return recipe
        data = recipe_stage_data(recipe, names.index(stage))
        if data.eval is not None and len(data.eval):
            kwargs["probe_rows"] = data.eval.to_list()
        else:
            kwargs["probe_note"] = f"the stage '{stage}' has no held-out rows (eval_fraction 0)"
    except PrefoptError as e:
        kwargs["probe_note"] = f"the stage '{stage}' held-out rows cannot be read ({str(e).splitlines()[0]})"
    return recipe


def _log_merge(recipe, run_dir: Path, manifest: dict, entry: dict, out: Path, record: dict, *, rollback: bool,
               echo) -> None:
    """The merged model to W&B when the run's recipe tracks (a merge is never undone for W&B: a recipe that cannot
    be read, or tracking that cannot run, is said and skipped)."""
    try:
        recipe = recipe or load_recipe(run_dir / "recipe.yaml")
    except PrefoptError as e:
        echo(f"prefopt: merge: not logged to W&B: {run_dir / 'recipe.yaml'} cannot be read "
             f"({str(e).splitlines()[0]})")
        return
    problems = check_wandb(recipe)
    if problems:
        echo(f"prefopt: merge: not logged to W&B: {problems[0]}")
        return
    log_merge(recipe, run_dir, manifest["run_id"], entry, out, record, rollback=rollback)
