"""The merge step of a run (the recipe's merge section, after the evaluation) and `prefopt merge RUN_DIR`: the
final adapter merged into its base and verified (prefopt.merging does the work), its model card written."""

from __future__ import annotations

from pathlib import Path

from .. import dist
from ..config import Recipe, load_recipe
from ..data import recipe_stage_data
from ..errors import GateFailed, MergeError, PrefoptError, option
from ..eval.card import write_model_card
from ..merging.stream import Thresholds, merge_adapter
from ..models import BASE_INFO
from ..runs import folder as runfolder
from ..runs.folder import adapter_hash, failed_gates, gate_line, read_eval_log, read_manifest


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
    key = recipe.section_hash(mc.model_dump(mode="json"), manifest["stages"][-1]["inputs_hash"], adapter_hash(final))
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
                           report_extra={"inputs_hash": key})
    except BaseException:
        manifest["merge"]["status"] = "failed"
        save_manifest()
        raise
    manifest["merge"].update(status="done", verification=report.get("verification"))
    save_manifest(commit=True)
    return report


def merge_run(run_dir: str | Path, out_dir: str | Path | None = None, *, recipe=None, ignore_gates: bool = False,
              **kwargs) -> dict:
    """Merge a run folder's final adapter; probes are the last stage's held-out rows. A run whose evaluation
    failed a gate is refused (GateFailed) unless ignore_gates. With an eval log, merged/README.md is its model card."""

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if not manifest or not manifest.get("stages"):
        raise MergeError(f"{run_dir}: no run.json with stages; is this a prefopt run folder?")
    last = manifest["stages"][-1]
    if last["status"] != "done":
        raise MergeError(f"{run_dir}: the last stage '{last['name']}' is {last['status']}; finish the run first")
    log = read_eval_log(run_dir)
    if log is not None and log.get("adapter_hash") != adapter_hash(run_dir / last["adapter"]):
        log = None  # an evaluation of an earlier adapter says nothing about this one
    if failed_gates(log) and not ignore_gates:
        raise GateFailed(f"{run_dir}: {gate_line(failed_gates(log))}; refusing to merge "
                         f"(pass {option('ignore_gates')} to "
                         "merge anyway)")
    if "probe_rows" not in kwargs:
        kwargs["probe_rows"], kwargs["probe_note"] = None, None
        try:
            recipe = recipe or load_recipe(run_dir / "recipe.yaml")
            data = recipe_stage_data(recipe, len(recipe.stages) - 1)
            if data.eval is not None and len(data.eval):
                kwargs["probe_rows"] = data.eval.to_list()
            else:
                kwargs["probe_note"] = f"the last stage '{last['name']}' has no held-out rows (eval_fraction 0)"
        except PrefoptError as e:
            kwargs["probe_note"] = f"the last stage's held-out rows cannot be read ({str(e).splitlines()[0]})"
    if recipe is not None and recipe.adapter.method == "dora":
        kwargs.setdefault("dora_impl", recipe.adapter.dora_impl)
        kwargs.setdefault("dora_dropout", recipe.adapter.dora_dropout)
    adapter_dir = run_dir / last["adapter"]
    if not (adapter_dir / BASE_INFO).is_file():  # older run folders: the recipe says how the base was loaded
        recipe = recipe or load_recipe(run_dir / "recipe.yaml")
        kwargs.setdefault("base", recipe.model_path())
        kwargs.setdefault("quantization", recipe.model.quantization)
        kwargs.setdefault("dtype", recipe.model.dtype)
    out = Path(out_dir) if out_dir else run_dir / "merged"
    report = merge_adapter(adapter_dir, out, **kwargs)
    if log is not None:
        write_model_card(out, run_dir)
    return report

