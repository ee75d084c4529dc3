"""The training step of a run: each stage in order, through its TRL trainer, the same adapter carried along.

A stage that is done and whose inputs (its recipe section, the model and adapter sections, the rows after the data
step, the adapter it starts from) are unchanged is skipped; one finished elsewhere with the same inputs is reused
from the shared store; one interrupted is resumed from its last checkpoint. Each stage is written to a temp folder
and renamed into place, so a killed run never leaves a half-written stage that looks finished.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .. import dist, signals, tracking
from ..advice import diagnose, early_stopping
from ..config import REFERENCE_TYPES, identity
from ..data import trained_max_length
from ..data.report import write_reports
from ..models import (
    BASE_INFO,
    INIT_ADAPTER,
    ModelSpec,
    adapter_config_from_section,
    base_info,
    load_model,
    whole_weights_on_load,
)
from ..runs import folder as runfolder
from ..runs import store
from ..runs.folder import adapter_hash, stage_tmp, write_atomic
from ..runs.lineage import read_lineage
from ..runs.records import data_entry, now
from ..stages import STAGES, ref_columns
from ..stages.progress import progress_callback
from .data import reference_filter
from .lineage import kept_stage, record_trained, stage_record


@dataclass
class StageResult:
    name: str
    type: str
    adapter: Path
    metrics: dict
    skipped: bool = False


def run_stages(recipe, run_dir: Path, data: list, records, *, fresh: bool, echo) -> list[StageResult]:
    """Every stage in order; each starts from the adapter the one before it wrote."""
    shared = store.shared_dir(recipe.cache_dir)
    results: list[StageResult] = []
    for i in range(len(recipe.stages)):
        if signals.stop_requested():  # a signal or a closed console before the stage: nothing to save
            raise signals.Terminated()
        prev_adapter = results[-1].adapter if results else None
        results.append(run_stage(recipe, i, data[i], prev_adapter, run_dir, records, shared, fresh=fresh, echo=echo))
    return results


def stage_inputs(recipe, i: int, data, prev_adapter: Path | None) -> str:
    """What stage i's adapter depends on: a finished stage with the same inputs hash is not trained again."""
    recipe_dict = recipe.to_dict()
    return recipe.section_hash(
        runfolder.stage_identity(recipe.stages[i].model_dump(mode="json")),
        runfolder.model_identity(recipe_dict["model"]),
        identity("adapter", recipe_dict["adapter"]),
        recipe.seed,
        i,
        data.fingerprint,  # the rows after the data step: a changed file or filter that keeps them keeps the stage
        *_stopping_identity(recipe.stages[i], data),
        adapter_hash(prev_adapter) if prev_adapter else None,
        *([("processes", dist.world_size())] if dist.world_size() > 1 else []),  # the global batch changes
    )


def _history(stage_dir: Path) -> list[dict]:
    try:
        return json.loads((stage_dir / "log_history.json").read_text())
    except (OSError, ValueError):
        return []


def _stopping_identity(stage, data) -> list:
    """What train.early_stopping: auto decided (left out when off, so stages from before it keep their hash)."""
    if stage.train.early_stopping != "auto":
        return []  # an explicit section (or null) is in the stage section itself
    on, _ = early_stopping(stage, len(data.train), data.eval is not None)
    return [("early_stopping", on.model_dump(mode="json"))] if on is not None else []


def ref_logps_key(recipe, i: int, prev_adapter: Path | None, data) -> str:
    """Everything the reference log-probs depend on (not beta or loss_type, which only use them)."""
    import torch

    st = recipe.stages[i]
    ref = "base" if (prev_adapter is None or st.reference == "base") else adapter_hash(prev_adapter)
    kw = {k: v for k, v in st.trainer_kwargs.items()
          if k in ("truncation_mode", "ld_alpha", "padding_free", "pad_to_multiple_of", "use_logits_to_keep",
                   "bf16", "fp16", "tf32")}
    return recipe.section_hash(
        "ref_logps/1", ref, runfolder.model_identity(recipe.model.model_dump(mode="json")),
        identity("adapter", recipe.adapter.model_dump(mode="json")), data.fingerprint,
        st.data.quality.reference_filter.model_dump(mode="json") if st.data.quality.reference_filter else None,
        trained_max_length(st), st.effective_max_length(), kw,
        # LD-DPO weighs the reference's log-probs too (a stage field since issue 24; trainer_kwargs before)
        *([("ld_alpha", st.ld_alpha)] if getattr(st, "ld_alpha", None) is not None else []),
        # KTO's KL completions rotate within each training batch, and apo_zero_unpaired computes none
        *([("kto", st.trainer_kwargs.get("per_device_train_batch_size", st.train.batch_size),
            st.loss_type != "apo_zero_unpaired")] if st.type == "kto" else []),
        "cuda" if torch.cuda.is_available() else "cpu",
        os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))  # accelerate launch's precision, read by the trainer



def _new_entry(stage, stage_dir: Path, prev_adapter: Path | None, run_dir: Path, inputs: str, data) -> dict:
    """The stage's run.json entry before anything is decided."""
    entry = {
        "name": stage.name,
        "type": stage.type,
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
    if stage.type in REFERENCE_TYPES:
        entry["reference"] = "base" if (prev_adapter is None or stage.reference == "base") else "previous_stage"
    return entry


def run_stage(recipe, i: int, data, prev_adapter: Path | None, run_dir: Path, records, shared: Path | None, *,
              fresh: bool, echo) -> StageResult:
    """Stage i: kept (done, unchanged), reused from the shared store, or trained (resumed where it can be)."""
    st = recipe.stages[i]
    stage_dir = run_dir / "stages" / recipe.stage_dirname(i)
    inputs = stage_inputs(recipe, i, data, prev_adapter)
    entry = _new_entry(st, stage_dir, prev_adapter, run_dir, inputs, data)
    records.manifest["stages"].append(entry)
    # read and decided on the main process, the same for every rank; --fresh trains every stage again: nothing is
    # reused from the shared store (finished stages still go to it)
    decision = dist.on_main_then_share(store.decide_stage, records.old_stages.get(st.name), inputs, stage_dir,
                                       None if fresh else shared, recipe.model_path())
    if fresh:  # --fresh clears the folder when the run commits: no checkpoint of the old one to resume from
        decision.resume, decision.stale = None, False
    if decision.reused_from:
        records.commit()  # the stage folder now holds the stored stage
        entry["reused_from"] = decision.reused_from
        echo(f"prefopt: stage {st.name}: reused from {decision.reused_from} (the shared store {shared}: same inputs)")
    if decision.done:
        entry.update({k: decision.record[k] for k in ("status", "metrics", "started_at", "ended_at", "attempts",
                                                       "ref_logps", "resumed_from_step", "reused_from", "diagnostics")
                      if k in decision.record})
        if entry.get("diagnostics") is None and dist.is_main():  # (a stage stored before diagnostics were kept)
            entry["diagnostics"] = diagnose(st, _history(stage_dir), entry.get("metrics") or {})
        entry["lineage"] = dist.on_main_then_share(kept_stage, recipe, i, data, prev_adapter, run_dir,
                                                   records.manifest["run_id"], entry)
        records.save()
        if "reused_from" not in entry:
            echo(f"prefopt: stage {st.name}: done and unchanged, skipped")
        return StageResult(st.name, st.type, stage_dir / "adapter", entry["metrics"], skipped=True)
    metrics = _train_recorded(recipe, i, data, prev_adapter, run_dir, records, shared, entry, decision, echo)
    took = metrics.get("train", {}).get("train_runtime")
    steps = metrics.get("train", {}).get("steps")
    echo(f"prefopt: stage {st.name} done" + (f" in {took:.1f} s" if isinstance(took, (int, float)) else "")
         + (f", {steps} steps" if steps else "") + f": {summarise(metrics)}")
    return StageResult(st.name, st.type, stage_dir / "adapter", metrics)


def _train_recorded(recipe, i, data, prev_adapter, run_dir, records, shared, entry, decision, echo) -> dict:
    """Train stage i, its run.json entry kept current: running, then done, failed or interrupted."""
    st = recipe.stages[i]
    stage_dir = run_dir / "stages" / recipe.stage_dirname(i)
    entry.update(status="running", started_at=now(), attempts=(decision.record or {}).get("attempts", 0) + 1,
                 pid=os.getpid(), host=socket.gethostname())  # `prefopt status` tells running from killed
    tmp = stage_tmp(stage_dir)
    resume = decision.resume
    if resume is not None:
        entry["resumed_from_step"] = resume[1]
        echo(f"prefopt: resuming stage {st.name} from step {resume[1]} ({resume[0].relative_to(run_dir)})")
    elif decision.stale:
        echo(f"prefopt: stage {st.name}: its checkpoints were made with other inputs (recipe section, data, "
             "model or starting adapter changed); starting it over")
    records.save()
    echo(f"prefopt: stage {i + 1}/{len(recipe.stages)} {st.name} ({st.type}): "
         f"{entry['data']['train_rows']} train rows, {entry['data']['eval_rows']} eval rows")
    try:
        ref_cache = None
        if st.type in REFERENCE_TYPES and st.precompute_ref_log_probs:
            ref_cache = store.RefLogpsCache(ref_logps_key(recipe, i, prev_adapter, data),
                                            [run_dir / "cache"] + ([shared] if shared else []), ref_columns(st))
        metrics = train_in_folder(recipe, i, data, stage_dir, prev_adapter, run_dir, records.manifest["run_id"],
                                  attempt=entry["attempts"], inputs_hash=entry["inputs_hash"],
                                  resume_from=resume[0] if resume else None, ref_cache=ref_cache,
                                  begin=records.commit, echo=echo)
    except BaseException as e:
        entry.pop("pid", None)
        entry.pop("host", None)
        entry.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", ended_at=now())
        if entry["status"] == "failed":
            entry["error"] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]
        last = runfolder.last_checkpoint(tmp) if dist.is_main() else None
        if last is not None:
            entry["last_checkpoint_step"] = last[1]
        records.save()
        raise
    if "ref_logps" in metrics:
        entry["ref_logps"] = metrics.pop("ref_logps")
    if dist.is_main():
        entry["diagnostics"] = diagnose(st, _history(stage_dir), metrics)
        for d in entry["diagnostics"]:
            echo(f"prefopt: diagnostic: stage {st.name}: {d['what']}; {d['suggestion']}")
    entry.pop("pid", None)
    entry.pop("host", None)
    entry.update(status="done", ended_at=now(), metrics=metrics, data=data_entry(data.report),
                 lineage=read_lineage(stage_dir / "adapter"))
    records.save()
    if dist.is_main():
        store.store_stage(shared, entry["inputs_hash"], stage_dir, entry)
    return metrics


def train_in_folder(recipe, i: int, data, stage_dir: Path, prev_adapter: Path | None, run_dir: Path, run_id: str,
                    attempt: int = 1, inputs_hash: str = "", resume_from: Path | None = None, ref_cache=None,
                    begin=None, echo=print) -> dict:
    """Load the base, attach the running adapter, train, and move the finished folder into place. `begin()` is
    called once the model is loaded, before anything is written: the run's records are committed there."""
    from transformers import set_seed

    st = recipe.stages[i]
    set_seed(recipe.seed)
    spec = ModelSpec.of(recipe)
    base, model, tokenizer = load_model(spec, adapter_config_from_section(recipe.adapter), adapter=prev_adapter,
                                        init_rows=data.train if prev_adapter is None else None)
    initial = model.__dict__.get("_prefopt_initial_adapter")  # a base-rewriting init's record, carried along
    zero_rows = model.__dict__.get("_prefopt_zero_rows")  # DoRA: base rows of norm 0 per module
    if begin is not None:
        begin()
    tmp = _prepare_temp(stage_dir, inputs_hash, resume_from)
    if reference_filter(model, tokenizer, st, data, tmp, first_stage=prev_adapter is None, seed=recipe.seed):
        rf = data.report["reference_filter"]
        echo(f"prefopt: data {st.name}: reference filter ({rf['score']}, {rf['reference']}) dropped "
             f"{rf['dropped']} training rows scoring below {rf['threshold']:.4f}; {len(data.train)} train rows left")
    if dist.is_main():
        write_reports(tmp, data)
    lineage = stage_record(recipe, i, data, prev_adapter, inputs_hash, run_dir, run_id)
    metrics = _train_tracked(recipe, i, model, tokenizer, data, tmp, run_dir, run_id, attempt, resume_from,
                             ref_cache, echo, lineage=lineage, prev_adapter=prev_adapter)
    if zero_rows:
        metrics["dora_zero_rows"] = zero_rows
    info = base_info(base, name_or_path=spec.name_or_path, quantization=spec.quantization, dtype=spec.dtype)
    del model, base
    _free_memory()
    dist.barrier()  # every rank is done with the checkpoints
    if dist.is_main():
        if initial is not None:
            _carry_initial_adapter(initial, tmp / "adapter")
        _move_into_place(tmp, stage_dir, info)
    dist.barrier()  # the next stage starts from this one's adapter, on every rank
    return metrics


def _prepare_temp(stage_dir: Path, inputs_hash: str, resume_from: Path | None) -> Path:
    """The stage's temp folder, new unless a checkpoint in it is resumed, with the inputs its checkpoints belong to."""
    tmp = stage_tmp(stage_dir)
    if dist.is_main():
        if resume_from is None and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        write_atomic(tmp / runfolder.STAGE_INPUTS, inputs_hash)
    dist.barrier()
    return tmp


def _train_tracked(recipe, i, model, tokenizer, data, tmp, run_dir, run_id, attempt, resume_from, ref_cache, echo,
                   *, lineage: dict, prev_adapter: Path | None):
    """The stage's trainer, in a W&B run of its own (one per stage, grouped by run); the adapter's lineage is
    written beside it and, in that run, logged as its artifact."""
    st = recipe.stages[i]
    with tracking.stage_run(
        recipe.tracking.wandb,
        run_dir=run_dir,
        group=tracking.group_of(recipe.tracking.wandb, recipe.name, run_id),
        # a rerun of a stage is a new W&B run in the same group: its own name, not a second "<recipe>/<stage>"
        name=f"{recipe.name}/{st.name}" + (f"#{attempt}" if attempt > 1 else ""),
        job_type=st.type,
        config=recipe.to_dict() | {"stage": st.name, "stage_index": i, "data_step": data_entry(data.report)},
    ) as (report_to, log_summary):
        metrics = STAGES[st.type](
            model, tokenizer, st, data, tmp, seed=recipe.seed, report_to=report_to, run_name=f"{recipe.name}/{st.name}",
            resume_from=resume_from, ref_cache=ref_cache, echo=echo,
            callbacks=[progress_callback(st.name, st.type, i, len(recipe.stages))],
        )
        log_summary(metrics)
        if dist.is_main():
            record_trained(recipe, lineage, tmp / "adapter", prev_adapter)
    return metrics


def _free_memory() -> None:
    import torch

    whole_weights_on_load()  # the finished trainer's ZeRO-3 config would partition the next load (see there)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _carry_initial_adapter(initial: Path, adapter_dir: Path) -> None:
    """Every adapter trained from a base-rewriting init (pissa, olora) holds the initial adapter (init_adapter/): how
    the base was rewritten, which every later load, the evaluation's base and the merge need. The temporary folder
    the first stage made it in is removed once copied."""
    dest = adapter_dir / INIT_ADAPTER
    if initial.resolve() != dest.resolve():
        shutil.copytree(initial, dest, dirs_exist_ok=True)
    if initial.name.startswith("prefopt-initial-adapter-"):
        shutil.rmtree(initial, ignore_errors=True)


def _move_into_place(tmp: Path, stage_dir: Path, info: dict) -> None:
    """The finished stage replaces the folder (an older version of it, if any) in one rename."""
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


def summarise(metrics: dict) -> str:
    """One line of a finished stage's figures."""
    train, ev = metrics.get("train", {}), metrics.get("eval", {})
    parts = []
    def num(v):  # a NaN or inf figure is recorded as None (run.json is JSON): shown as nan
        return f"{v:.4f}" if isinstance(v, (int, float)) else "nan"

    if "train_loss" in train:
        parts.append(f"train loss {num(train['train_loss'])}")
    if "eval_loss" in ev:
        parts.append(f"eval loss {num(ev['eval_loss'])}")
    acc = ev.get("eval_rewards/accuracies")
    if isinstance(acc, (int, float)):
        parts.append(f"held-out reward accuracy {acc:.2f} (chance 0.50)")
    margin = ev.get("eval_rewards/margins")
    if isinstance(margin, (int, float)):
        parts.append(f"held-out reward margin {margin:.3f}")
    return ", ".join(parts) or "no metrics"
