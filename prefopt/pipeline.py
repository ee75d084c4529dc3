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

from .version import __version__
from .runs import store as cache, folder as runfolder
from . import dist
from .config import PREFERENCE_TYPES, Recipe
from .errors import GateFailed
from .runs.folder import ADAPTER_FILES, adapter_hash, read_manifest, stage_tmp, write_atomic  # noqa: F401


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


def preflight(recipe: Recipe, echo=None, output_dir=None):
    """Every problem that can be found before a model loads (see prefopt.preflight); returns the checked data."""
    from .preflight import preflight as _preflight

    return _preflight(recipe, echo=echo, output_dir=output_dir)


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
    from .data.report import summary_lines

    COMMITTED["run_dir"] = None
    dist.init()  # under torchrun / accelerate launch: the process group; only the main process writes and speaks
    if not dist.is_main():
        echo = _silent
    run_dir = Path(output_dir) if output_dir else Path("runs") / recipe.name
    runfolder.check_output_dir(run_dir, recipe_name=recipe.name, stages=[(s.name, s.type) for s in recipe.stages],
                               fresh=fresh)
    # From here on the recipe is the self-contained one the run folder records (absolute paths, data hashes).
    recipe = runfolder.self_contained(recipe)
    checked = preflight(recipe, echo=echo, output_dir=run_dir)
    recipe_dict = recipe.to_dict()
    # Nothing is written to the run folder until new work is committed: a stage that has loaded its model and
    # starts training, a stage reused from the shared store, a new evaluation or merge, or the end of the run. A
    # run that fails before leaves the folder byte-identical; later stages keep their records until retrained.
    manifest, old_stages = dist.main_first(_read_run_folder, recipe, run_dir, fresh)
    records = _Records(recipe, run_dir, fresh, manifest, old_stages, echo)
    save_manifest = records.save

    for note in [adapter_note(recipe), *stage_notes(recipe)]:
        echo(f"prefopt: {note}")
    for data in checked.data:
        for line in summary_lines(data.report):
            echo(f"prefopt: {line}")

    result = RunResult(run_dir=run_dir)
    store = cache.shared_dir(recipe.cache_dir)
    prev_adapter: Path | None = None
    from . import signals

    for i, st in enumerate(recipe.stages):
        if signals.stop_requested():  # a signal or a closed console before the stage: nothing to save
            raise signals.Terminated()
        stage_dir = run_dir / "stages" / recipe.stage_dirname(i)
        data = checked.data[i]
        inputs = recipe.section_hash(
            runfolder.stage_identity(st.model_dump(mode="json")),
            runfolder.model_identity(recipe_dict["model"]),
            recipe_dict["adapter"],
            recipe.seed,
            i,
            data.fingerprint,  # the rows after the data step: a changed file or filter that keeps them keeps the stage
            adapter_hash(prev_adapter) if prev_adapter else None,
            *([("processes", dist.world_size())] if dist.world_size() > 1 else []),  # the global batch changes
        )
        entry = {
            "name": st.name,
            "type": st.type,
            "status": "pending",
            "adapter": str(Path("stages") / stage_dir.name / "adapter"),
            "starts_from": str(prev_adapter.relative_to(run_dir)) if prev_adapter else None,
            "inputs_hash": inputs,
            # the rows the stage trains and evaluates on, after the data step (its report: stages/NN-name/)
            "data": data_entry(data.report),
            "metrics": {},
            "started_at": None,
            "ended_at": None,
        }
        if st.type == "dpo":
            entry["reference"] = "base" if (prev_adapter is None or st.reference == "base") else "previous_stage"
        manifest["stages"].append(entry)
        # read and decided on the main process, the same for every rank
        # --fresh trains every stage again: nothing is reused from the shared store (finished stages still go to it)
        done, was, reused, resume, stale = dist.main_first(cache.decide_stage, old_stages.get(st.name), inputs,
                                                           stage_dir, None if fresh else store, recipe.model_path())
        if fresh:  # --fresh clears the folder when the run commits: no checkpoint of the old one to resume from
            resume, stale = None, False
        if reused:
            records.commit()  # the stage folder now holds the stored stage
            entry["reused_from"] = reused
            echo(f"prefopt: stage {st.name}: reused from {reused} (the shared store {store}: same inputs)")
        if done:
            entry.update({k: was[k] for k in ("status", "metrics", "started_at", "ended_at", "attempts", "ref_logps",
                                              "resumed_from_step", "reused_from") if k in was})
            save_manifest()
            if "reused_from" not in entry:
                echo(f"prefopt: stage {st.name}: done and unchanged, skipped")
            result.stages.append(StageResult(st.name, st.type, stage_dir / "adapter", entry["metrics"], skipped=True))
            prev_adapter = stage_dir / "adapter"
            continue

        entry.update(status="running", started_at=_now(), attempts=(was or {}).get("attempts", 0) + 1)
        tmp = stage_tmp(stage_dir)
        if resume is not None:
            entry["resumed_from_step"] = resume[1]
            echo(f"prefopt: resuming stage {st.name} from step {resume[1]} ({resume[0].relative_to(run_dir)})")
        elif stale:
            echo(f"prefopt: stage {st.name}: its checkpoints were made with other inputs (recipe section, data, "
                 "model or starting adapter changed); starting it over")
        save_manifest()
        echo(f"prefopt: stage {i + 1}/{len(recipe.stages)} {st.name} ({st.type}): "
             f"{entry['data']['train_rows']} train rows, {entry['data']['eval_rows']} eval rows")
        try:
            ref_cache = None
            if st.type == "dpo" and st.precompute_ref_log_probs:
                ref_cache = cache.RefLogpsCache(cache.ref_logps_key(recipe, i, prev_adapter, data),
                                                [run_dir / "cache"] + ([store] if store else []))
            metrics = run_stage_in_folder(recipe, i, data, stage_dir, prev_adapter, run_dir, manifest["run_id"],
                                          attempt=entry["attempts"], inputs_hash=inputs,
                                          resume_from=resume[0] if resume else None, ref_cache=ref_cache,
                                          begin=records.commit, echo=echo)
        except BaseException as e:
            entry.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", ended_at=_now())
            last = runfolder.last_checkpoint(tmp) if dist.is_main() else None
            if last is not None:
                entry["last_checkpoint_step"] = last[1]
            save_manifest()
            raise
        if "ref_logps" in metrics:
            entry["ref_logps"] = metrics.pop("ref_logps")
        entry.update(status="done", ended_at=_now(), metrics=metrics, data=data_entry(data.report))
        save_manifest()
        if dist.is_main():
            cache.store_stage(store, inputs, stage_dir, entry)
        echo(f"prefopt: stage {st.name} done: {summarise(st.type, metrics)}")
        result.stages.append(StageResult(st.name, st.type, stage_dir / "adapter", metrics))
        prev_adapter = stage_dir / "adapter"

    save_manifest()
    from .evaluation import evaluate_apart, evaluate_final, write_report

    ok = False

    try:  # evaluation and merge: the main process; the others wait for it
        if recipe.eval is not None and dist.world_size() > 1:
            # lm-eval and generation issue collectives of their own under a launcher, which the waiting ranks would
            # answer with the wrong ones: the main process evaluates in a process of its own (`prefopt eval`)
            records.commit()  # the evaluating process reads this run's recipe.yaml and run.json: they must be current
            result.eval_log = dist.main_first(evaluate_apart, run_dir, manifest, echo)
        elif recipe.eval is not None:
            result.eval_log = dist.main_first(evaluate_final, recipe, run_dir, manifest, checked.data, save_manifest,
                                              echo)
        if recipe.merge is not None:
            result.merge_report = dist.main_first(merge_final, recipe, run_dir, manifest, save_manifest, echo)
        ok = True
    except GateFailed:
        ok = True  # a new evaluation's verdict: it is recorded (the report shows a run stopped by a gate too)
        raise
    finally:
        if dist.is_main():
            if ok:  # the run's records now describe the folder (written only where they changed)
                records.commit()
            if records.changed:
                write_report(run_dir, echo)
        dist.barrier()  # no rank exits (and has the launcher stop the others) before the main process has written
    return result


def _silent(_line: str) -> None:
    """The echo of every process but the main one (one console, not one per rank)."""


def _read_run_folder(recipe: Recipe, run_dir: Path, fresh: bool) -> tuple[dict, dict]:
    """The main process reads the run folder (writes nothing): the new manifest, and the old stages by name."""
    old = {} if fresh else (read_manifest(run_dir) or {})
    manifest = {
        "prefopt_version": __version__,
        "recipe_name": recipe.name,
        "recipe_hash": recipe.section_hash(recipe.to_dict()),
        "run_id": old.get("run_id") or uuid.uuid4().hex[:12],
        "created_at": old.get("created_at") or _now(),
        "stages": [],
    }
    for key in ("eval", "merge"):
        if old.get(key):
            manifest[key] = old[key]
    return manifest, {s["name"]: s for s in old.get("stages", [])}


COMMITTED: dict = {"run_dir": None}  # the run folder this process has committed work to (bug logs may go there)


class _Records:
    """The run folder's records (run.json, recipe.yaml), written only once new work is committed.

    Until `commit()`, `save()` writes nothing. run.json lists the stages the run has reached, then the stages it
    has not reached yet as the previous run recorded them (a failure in stage 1 leaves stage 2's record alone)."""

    def __init__(self, recipe: Recipe, run_dir: Path, fresh: bool, manifest: dict, old_stages: dict, echo):
        self.recipe, self.run_dir, self.fresh, self.manifest, self.old_stages = recipe, run_dir, fresh, manifest, \
            old_stages
        self.echo = echo
        self.committed = False
        self.changed = False  # something was written

    def current(self) -> dict:
        reached = {e["name"] for e in self.manifest["stages"]}
        rest = [self.old_stages[s.name] for s in self.recipe.stages
                if s.name not in reached and s.name in self.old_stages]
        return {**self.manifest, "stages": self.manifest["stages"] + rest}

    def commit(self) -> None:
        """New work is about to be (or was) written: prepare the folder once, then keep the records current."""
        if not dist.is_main():
            return
        if not self.committed:
            self.committed = True
            COMMITTED["run_dir"] = self.run_dir
            run_dir = self.run_dir
            if self.fresh:
                runfolder.clear_for_fresh(run_dir)
            (run_dir / "stages").mkdir(parents=True, exist_ok=True)
            for name in runfolder.clean_temp(run_dir):
                self.echo(f"prefopt: removed {name}, left behind by an interrupted run")
            # run.json first, so the folder is recognisably a prefopt run folder from here on
            self.changed |= runfolder.write_if_changed(run_dir / runfolder.MANIFEST, self._manifest_text())
            self.changed |= runfolder.write_if_changed(run_dir / runfolder.RECIPE, self.recipe.to_yaml())
            # Stages dropped from the recipe since the last run leave run.json (above) and stages/.
            keep = {self.recipe.stage_dirname(i) for i in range(len(self.recipe.stages))}
            for name in runfolder.move_dropped_stages(run_dir, keep):
                self.changed = True
                self.echo(f"prefopt: stage folder {name} is not in the recipe any more; moved to dropped/{name}")
        self.save()

    def save(self, commit: bool = False) -> None:
        if commit:
            self.commit()
        elif dist.is_main() and self.committed:
            self.changed |= runfolder.write_if_changed(self.run_dir / runfolder.MANIFEST, self._manifest_text())

    def _manifest_text(self) -> str:
        text = json.dumps(self.current(), indent=2)
        old = read_manifest(self.run_dir)
        if old is not None and _same_records(old, self.current()):
            return (self.run_dir / runfolder.MANIFEST).read_text()  # the same records: the file as it is
        return text


def _same_records(a: dict, b: dict) -> bool:
    """Two manifests that say the same (key order aside)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def data_entry(report: dict) -> dict:
    """run.json's summary of a stage's data report."""
    return {"input_rows": report["input_rows"], "train_rows": report["train_rows"], "eval_rows": report["eval_rows"],
            "dropped": {k: v for k, v in report["dropped"].items() if v}}


def merge_final(recipe: Recipe, run_dir: Path, manifest: dict, save_manifest, echo) -> dict:
    """The recipe's merge section: merge the last adapter into runs/<name>/merged/ (redone when it changed)."""
    from .merging.stream import Thresholds, merge_run

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
    save_manifest(commit=True)
    return report


def run_stage_in_folder(recipe: Recipe, i: int, data, stage_dir: Path, prev_adapter: Path | None, run_dir: Path,
                        run_id: str, attempt: int = 1, inputs_hash: str = "", resume_from: Path | None = None,
                        ref_cache=None, begin=None, echo=print) -> dict:
    """Load the base, attach the running adapter, train, and move the finished folder into place. `begin()` is
    called once the model is loaded, before anything is written: the run's records are committed there."""
    import torch
    from transformers import set_seed

    from . import tracking
    from .data.report import write_reports
    from .models import (BASE_INFO, adapter_config_from_section, attach_adapter, base_info, load_base_model,
                         load_tokenizer, whole_weights_on_load)
    from .stages import STAGES

    st = recipe.stages[i]
    m = recipe.model
    tmp = stage_tmp(stage_dir)
    main = dist.is_main()
    set_seed(recipe.seed)
    base = load_base_model(recipe.model_path(), quantization=m.quantization, dtype=m.dtype, revision=m.revision,
                           trust_remote_code=m.trust_remote_code, quant_storage=m.quant_storage)
    tokenizer = load_tokenizer(recipe.model_path(), chat_template=m.chat_template, revision=m.revision,
                               trust_remote_code=m.trust_remote_code)
    a = recipe.adapter
    model = attach_adapter(base, adapter_config_from_section(a), init_from=prev_adapter, dora_impl=a.dora_impl,
                           dora_dropout=a.dora_dropout)
    if begin is not None:
        begin()
    if main:
        if resume_from is None and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        write_atomic(tmp / runfolder.STAGE_INPUTS, inputs_hash)  # the inputs its checkpoints belong to
    dist.barrier()
    # every rank filters (the same rows: deterministic); the main process writes the scores and reports
    if reference_filter(model, tokenizer, st, data, tmp, first_stage=prev_adapter is None, seed=recipe.seed):
        rf = data.report["reference_filter"]
        echo(f"prefopt: data {st.name}: reference filter ({rf['score']}, {rf['reference']}) dropped "
              f"{rf['dropped']} training rows scoring below {rf['threshold']:.4f}; {len(data.train)} train rows left")
    if main:
        write_reports(tmp, data)
    with tracking.stage_run(
        recipe.tracking.wandb,
        run_dir=run_dir,
        group=f"{recipe.name}-{run_id}",
        # a rerun of a stage is a new W&B run in the same group: its own name, not a second "<recipe>/<stage>"
        name=f"{recipe.name}/{st.name}" + (f"#{attempt}" if attempt > 1 else ""),
        job_type=st.type,
        config=recipe.to_dict() | {"stage": st.name, "stage_index": i, "data_step": data_entry(data.report)},
    ) as (report_to, log_summary):
        metrics = STAGES[st.type](
            model, tokenizer, st, data, tmp, seed=recipe.seed, report_to=report_to, run_name=f"{recipe.name}/{st.name}",
            resume_from=resume_from, ref_cache=ref_cache, echo=echo,
        )
        log_summary(metrics)
    info = base_info(base, name_or_path=recipe.model_path(), quantization=m.quantization, dtype=m.dtype)
    del model, base
    whole_weights_on_load()  # the finished trainer's ZeRO-3 config would partition the next load (see there)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    dist.barrier()  # every rank is done with the checkpoints
    if main:
        (tmp / "adapter" / BASE_INFO).write_text(json.dumps(info, indent=2))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        if stage_dir.exists():
            old = stage_dir.with_name(f".{stage_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(stage_dir, old)
            os.replace(tmp, stage_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, stage_dir)
    dist.barrier()  # the next stage starts from this one's adapter, on every rank
    return metrics


def reference_filter(model, tokenizer, st, data, folder: Path, *, first_stage: bool, seed: int) -> bool:
    """The opt-in reference-model filter, on the model the stage has just loaded (base + the running adapter)."""
    if st.data.quality.reference_filter is None:
        return False
    from .data import trained_max_length
    from .data.reference import apply_reference_filter, write_scores

    use_base = first_stage or st.type == "sft" or getattr(st, "reference", None) == "base"
    scores = apply_reference_filter(model, tokenizer, st, data, use_base=use_base, max_length=trained_max_length(st),
                                    seed=seed)
    if dist.is_main():
        write_scores(folder, scores)
    return bool(data.report["reference_filter"]["dropped"])


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
