"""run(recipe): the chain, the run folder, the manifest, resume.

runs/<name>/
  recipe.yaml                     resolved recipe, every default filled in
  run.json                        manifest (version, recipe hash, per stage: status, adapter, metrics, times)
  stages/NN-<name>/adapter/       PEFT adapter (safetensors, DoRA magnitude included) + tokenizer
  stages/NN-<name>/log_history.json
Each stage folder is written to a temp folder and renamed into place, so a killed run never leaves
a half-written stage that looks finished. Re-running skips each stage that is done and whose inputs
(its recipe section, the model/adapter sections, its data files, the adapter it starts from) are unchanged.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from . import runfolder
from .config import PREFERENCE_TYPES, Recipe
from .runfolder import ADAPTER_FILES, adapter_hash, read_manifest, write_atomic  # noqa: F401 (re-exported)


@dataclass
class StageResult:
    name: str
    type: str
    adapter: Path
    metrics: dict
    skipped: bool = False


@dataclass
class RunResult:
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def preflight(recipe: Recipe, echo=None):
    """Every problem that can be found before a model loads (see prefopt.preflight); returns the checked data."""
    from .preflight import preflight as _preflight

    return _preflight(recipe, echo=echo)


def adapter_note(recipe: Recipe) -> str:
    """The one adapter every stage shares, and which DoRA forward trains it."""
    a = recipe.adapter
    note = f"adapter: {a.method} r={a.r} alpha={a.alpha:g} dropout={a.dropout:g}, shared by every stage"
    if a.method == "dora":
        drop = {"lowrank": "on the low-rank branch only", "full": "on the whole layer input (PEFT's semantics)"}
        note += (f"; {'fast low-rank' if a.dora_impl == 'fast' else 'PEFT'} DoRA forward"
                 + (f", dropout {drop[a.dora_dropout]}" if a.dropout > 0 else ""))
    return note


def stage_notes(recipe: Recipe) -> list[str]:
    """What the chain will do about adapters and references, said at start-up."""
    notes = []
    for i, st in enumerate(recipe.stages):
        prev = recipe.stages[i - 1].name if i else None
        start = f"continues the adapter from '{prev}'" if prev else "starts a fresh adapter"
        if st.type == "dpo":
            if prev is None:
                ref = "reference: the base model (no stage before it)"
            elif st.reference == "base":
                ref = f"reference: the BASE model (adapter disabled), not '{prev}', because reference: base was asked for"
            else:
                ref = f"reference: a frozen copy of the adapter from '{prev}'"
            if st.precompute_ref_log_probs:
                ref += ", log-probs precomputed"
        elif st.type in PREFERENCE_TYPES:
            ref = "reference-free"
        else:
            ref = ""
        notes.append(f"{st.name} ({st.type}): {start}" + (f"; {ref}" if ref else ""))
    return notes


def run(recipe: Recipe, *, output_dir: str | Path | None = None, fresh: bool = False, echo=print) -> RunResult:
    """Run the recipe's stages in order; returns each stage's adapter path and metrics."""
    from .data import file_hash

    run_dir = Path(output_dir) if output_dir else Path("runs") / recipe.name
    runfolder.check_output_dir(run_dir, recipe_name=recipe.name, stages=[(s.name, s.type) for s in recipe.stages],
                               fresh=fresh)
    # From here on the recipe is the self-contained one the run folder records (absolute paths, data hashes).
    recipe = runfolder.self_contained(recipe)
    checked = preflight(recipe, echo=echo)
    if fresh:
        runfolder.clear_for_fresh(run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    for name in runfolder.clean_temp(run_dir):
        echo(f"prefopt: removed {name}, left behind by an interrupted run")

    recipe_dict = recipe.to_dict()
    old = read_manifest(run_dir) or {}
    old_stages = {s["name"]: s for s in old.get("stages", [])}
    manifest = {
        "prefopt_version": __version__,
        "recipe_name": recipe.name,
        "recipe_hash": recipe.section_hash(recipe_dict),
        "run_id": old.get("run_id") or uuid.uuid4().hex[:12],
        "created_at": old.get("created_at") or _now(),
        "stages": [],
    }
    for key in ("eval", "merge"):
        if old.get(key):
            manifest[key] = old[key]

    def save_manifest():
        write_atomic(run_dir / "run.json", json.dumps(manifest, indent=2))

    save_manifest()  # first, so the folder is recognisably a prefopt run folder from here on
    write_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
    # Stages dropped from the recipe since the last run leave run.json (above) and stages/.
    moved = runfolder.move_dropped_stages(run_dir, {recipe.stage_dirname(i) for i in range(len(recipe.stages))})
    for name in moved:
        echo(f"prefopt: stage folder {name} is not in the recipe any more; moved to dropped/{name}")

    for note in [adapter_note(recipe), *stage_notes(recipe)]:
        echo(f"prefopt: {note}")

    result = RunResult(run_dir=run_dir)
    prev_adapter: Path | None = None
    for i, st in enumerate(recipe.stages):
        stage_dir = run_dir / "stages" / recipe.stage_dirname(i)
        data = checked.data[i]
        inputs = recipe.section_hash(
            runfolder.stage_identity(st.model_dump(mode="json")),
            runfolder.model_identity(recipe_dict["model"]),
            recipe_dict["adapter"],
            recipe.seed,
            i,
            [file_hash(f) for f in data.files],
            adapter_hash(prev_adapter) if prev_adapter else None,
        )
        entry = {
            "name": st.name,
            "type": st.type,
            "status": "pending",
            "adapter": str(Path("stages") / stage_dir.name / "adapter"),
            "starts_from": str(prev_adapter.relative_to(run_dir)) if prev_adapter else None,
            "inputs_hash": inputs,
            # the rows the stage trains and evaluates on (after rows max_length would drop are left out)
            "data": {"train_rows": len(data.train), "eval_rows": len(data.eval) if data.eval is not None else 0,
                     **({"dropped_by_max_length": checked.dropped[i]} if checked.dropped[i] else {})},
            "metrics": {},
            "started_at": None,
            "ended_at": None,
        }
        if st.type == "dpo":
            entry["reference"] = "base" if (prev_adapter is None or st.reference == "base") else "previous_stage"
        manifest["stages"].append(entry)
        was = old_stages.get(st.name)
        if runfolder.stage_done(was, inputs, stage_dir):
            entry.update({k: was[k] for k in ("status", "metrics", "started_at", "ended_at", "attempts") if k in was})
            save_manifest()
            echo(f"prefopt: stage {st.name}: done and unchanged, skipped")
            result.stages.append(StageResult(st.name, st.type, stage_dir / "adapter", entry["metrics"], skipped=True))
            prev_adapter = stage_dir / "adapter"
            continue

        entry.update(status="running", started_at=_now(), attempts=(was or {}).get("attempts", 0) + 1)
        save_manifest()
        echo(f"prefopt: stage {i + 1}/{len(recipe.stages)} {st.name} ({st.type}): "
             f"{entry['data']['train_rows']} train rows, {entry['data']['eval_rows']} eval rows")
        try:
            metrics = run_stage_in_folder(recipe, i, data, stage_dir, prev_adapter, run_dir, manifest["run_id"],
                                          attempt=entry["attempts"])
        except BaseException:
            entry.update(status="failed", ended_at=_now())
            save_manifest()
            raise
        entry.update(status="done", ended_at=_now(), metrics=metrics)
        save_manifest()
        echo(f"prefopt: stage {st.name} done: {summarise(st.type, metrics)}")
        result.stages.append(StageResult(st.name, st.type, stage_dir / "adapter", metrics))
        prev_adapter = stage_dir / "adapter"

    save_manifest()
    try:
        if recipe.eval is not None:
            result.eval_log = evaluate_final(recipe, run_dir, manifest, checked.data, save_manifest, echo)
        if recipe.merge is not None:
            result.merge_report = merge_final(recipe, run_dir, manifest, save_manifest, echo)
    finally:  # the report shows a run stopped by a gate too
        write_report(run_dir, echo)
    return result


def write_report(run_dir: Path, echo) -> None:
    from .report import build_report

    echo(f"prefopt: report: {build_report(run_dir)}")


def eval_inputs(recipe: Recipe, manifest: dict, run_dir: Path) -> str:
    """What an evaluation's figures depend on: the eval section (its gates aside: they only judge the figures),
    every stage's inputs and the adapters it reads."""
    ev = recipe.eval
    stages = manifest["stages"] if ev.after == "every_stage" else manifest["stages"][-1:]
    return recipe.section_hash(ev.model_dump(mode="json", exclude={"gates"}),
                               [s["inputs_hash"] for s in manifest["stages"]],
                               [adapter_hash(run_dir / s["adapter"]) for s in stages])


def evaluate_final(recipe: Recipe, run_dir: Path, manifest: dict, data: list, save_manifest, echo,
                   force: bool = False, withdraw_merged: bool = True) -> dict:
    """The recipe's eval section after the last stage, before the merge. A failed gate stops the run (GateFailed,
    exit code 3), recorded in eval_log.json and run.json; an unchanged evaluation is not redone."""
    from .config import GateFailed
    from .eval import ModelSpec, StageEval, describe, evaluate_run, regate

    key = eval_inputs(recipe, manifest, run_dir)
    log = runfolder.read_eval_log(run_dir)
    if not force and log is not None and log.get("inputs_hash") == key and (manifest.get("eval") or {}).get(
            "inputs_hash") == key:
        log = regate(run_dir, recipe.eval.gates, [(s.name, s.type) for s in recipe.stages])
        manifest["eval"].update(passed=log["passed"], gates_failed=[g["name"] for g in runfolder.failed_gates(log)])
        save_manifest()
        echo(f"prefopt: eval: figures unchanged, not evaluated again; {describe(log)}")
    else:
        manifest["eval"] = {"status": "running", "inputs_hash": key, "path": f"{runfolder.EVAL}/{runfolder.EVAL_LOG}"}
        save_manifest()
        m, a = recipe.model, recipe.adapter
        spec = ModelSpec(recipe.model_path(), m.quantization, m.dtype, m.revision, m.trust_remote_code,
                         m.chat_template, a.dora_impl, a.dora_dropout)
        stages = [StageEval(name=e["name"], type=e["type"], adapter=run_dir / e["adapter"],
                            eval_rows=d.eval.to_list() if d.eval is not None else [], metrics=e.get("metrics") or {},
                            files=list(d.files), train_rows=len(d.train))
                  for e, d in zip(manifest["stages"], data)]
        try:
            seed = recipe.seed if recipe.eval.seed is None else recipe.eval.seed
            log = evaluate_run(run_dir, cfg=recipe.eval, spec=spec, stages=stages, seed=seed, run_id=manifest["run_id"],
                               recipe_hash=manifest["recipe_hash"], config=recipe.to_dict(), inputs_hash=key, adapter_hash=adapter_hash(stages[-1].adapter),
                               wandb=recipe.tracking.wandb, group=f"{recipe.name}-{manifest['run_id']}", echo=echo)
        except BaseException:
            manifest["eval"]["status"] = "failed"
            save_manifest()
            raise
        failed = runfolder.failed_gates(log)
        manifest["eval"].update(status="done", passed=log["passed"], gates_failed=[g["name"] for g in failed])
        save_manifest()
        echo(f"prefopt: eval: {describe(log)}")
    if not log.get("passed"):
        merged = run_dir / runfolder.MERGED
        if merged.exists() and withdraw_merged:
            # an earlier merge of a model that now fails a gate must not sit there as the run's result
            shutil.rmtree(merged)
            manifest.pop("merge", None)
            save_manifest()
            echo(f"prefopt: eval: removed {merged}, an earlier merge; the model fails a gate now")
        elif merged.exists():
            echo(f"prefopt: eval: warning: {merged} holds an earlier merge of a model that fails a gate now")
        raise GateFailed(f"{runfolder.gate_line(runfolder.failed_gates(log))}; the run stops before the merge "
                         f"(see {run_dir / runfolder.EVAL / runfolder.EVAL_LOG})")
    return log


def evaluate_existing(run_dir: str | Path, overrides=None, echo=print) -> dict:
    """`prefopt eval RUN_DIR`: (re)run the evaluation of a finished run, with its recorded recipe (its eval
    section, or the defaults when it has none). Raises GateFailed when a gate fails."""
    from .config import PrefoptError, load_recipe

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None or not (run_dir / runfolder.RECIPE).is_file():
        raise PrefoptError(f"{run_dir}: not a prefopt run folder (no run.json / recipe.yaml)")
    import yaml

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

    def save_manifest():
        write_atomic(run_dir / "run.json", json.dumps(manifest, indent=2))

    try:
        return evaluate_final(recipe, run_dir, manifest, data, save_manifest, echo, force=True, withdraw_merged=False)
    finally:
        write_report(run_dir, echo)


def merge_final(recipe: Recipe, run_dir: Path, manifest: dict, save_manifest, echo) -> dict:
    """The recipe's merge section: merge the last adapter into runs/<name>/merged/ (redone when it changed)."""
    from .merging import Thresholds, merge_run

    mc = recipe.merge
    out = run_dir / runfolder.MERGED
    # the merge's inputs: its section, the last stage's inputs and the adapter that stage actually wrote
    final = run_dir / manifest["stages"][-1]["adapter"]
    key = recipe.section_hash(mc.model_dump(mode="json"), manifest["stages"][-1]["inputs_hash"], adapter_hash(final))
    report = runfolder.merge_done(run_dir, manifest, key, verify=mc.verify)
    if report is not None:
        echo("prefopt: merge: done and unchanged, skipped")
        if runfolder.read_eval_log(run_dir) is not None:  # the evaluation or its reviews may be newer
            from .eval.card import write_model_card

            write_model_card(out, run_dir)
        return report
    thresholds = Thresholds(mc.max_rel_logit_diff, mc.mean_kl, mc.min_top1_agreement)
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
    save_manifest()
    return report


def run_stage_in_folder(recipe: Recipe, i: int, data, stage_dir: Path, prev_adapter: Path | None, run_dir: Path,
                        run_id: str, attempt: int = 1) -> dict:
    """Load the base, attach the running adapter, train, and move the finished folder into place."""
    import torch
    from transformers import set_seed

    from . import tracking
    from .models import BASE_INFO, adapter_config_from_section, attach_adapter, base_info, load_base_model, load_tokenizer
    from .stages import STAGES

    st = recipe.stages[i]
    m = recipe.model
    tmp = stage_dir.with_name(f".{stage_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    set_seed(recipe.seed)
    base = load_base_model(recipe.model_path(), quantization=m.quantization, dtype=m.dtype, revision=m.revision,
                           trust_remote_code=m.trust_remote_code)
    tokenizer = load_tokenizer(recipe.model_path(), chat_template=m.chat_template, revision=m.revision,
                               trust_remote_code=m.trust_remote_code)
    a = recipe.adapter
    model = attach_adapter(base, adapter_config_from_section(a), init_from=prev_adapter, dora_impl=a.dora_impl,
                           dora_dropout=a.dora_dropout)
    with tracking.stage_run(
        recipe.tracking.wandb,
        run_dir=run_dir,
        group=f"{recipe.name}-{run_id}",
        # a rerun of a stage is a new W&B run in the same group: its own name, not a second "<recipe>/<stage>"
        name=f"{recipe.name}/{st.name}" + (f"#{attempt}" if attempt > 1 else ""),
        job_type=st.type,
        config=recipe.to_dict() | {"stage": st.name, "stage_index": i},
    ) as (report_to, log_summary):
        metrics = STAGES[st.type](
            model, tokenizer, st, data, tmp, seed=recipe.seed, report_to=report_to, run_name=f"{recipe.name}/{st.name}"
        )
        log_summary(metrics)
    info = base_info(base, name_or_path=recipe.model_path(), quantization=m.quantization, dtype=m.dtype)
    (tmp / "adapter" / BASE_INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    del model, base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if stage_dir.exists():
        old = stage_dir.with_name(f".{stage_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(stage_dir, old)
        os.replace(tmp, stage_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, stage_dir)
    return metrics


def summarise(stage_type: str, metrics: dict) -> str:
    train, ev = metrics.get("train", {}), metrics.get("eval", {})
    parts = []
    if "train_loss" in train:
        parts.append(f"train loss {train['train_loss']:.4f}")
    if "eval_loss" in ev:
        parts.append(f"eval loss {ev['eval_loss']:.4f}")
    acc = ev.get("eval_rewards/accuracies")
    if acc is not None:
        parts.append(f"held-out reward accuracy {acc:.2f} (chance 0.50)")
    margin = ev.get("eval_rewards/margins")
    if margin is not None:
        parts.append(f"held-out reward margin {margin:.3f}")
    return ", ".join(parts) or "no metrics"
