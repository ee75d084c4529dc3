"""What a run records of where its adapters and merged models came from (prefopt.runs.lineage is the format), and
the same as W&B artifacts when tracking is on (prefopt.tracking): each trained stage's adapter, using its data files
and the adapter it started from; each merged model's metadata, using the adapter it merged."""

from __future__ import annotations

import socket
from pathlib import Path

from .. import tracking
from ..eval.log import versions
from ..runs import folder as runfolder
from ..runs.lineage import LINEAGE, data_files, read_lineage, seal_adapter, seal_merged

MERGE_FILES = (LINEAGE, runfolder.MERGE_REPORT, "README.md", "config.json")  # the model artifact's files


def stage_record(recipe, i: int, data, prev_adapter: Path | None, inputs_hash: str, run_dir: Path,
                 run_id: str) -> dict:
    """Stage i's lineage before it trains (seal_adapter adds its adapter's hash once written)."""
    st, m = recipe.stages[i], recipe.model
    return {
        "stage": st.name, "type": st.type, "index": i,
        "data": data_files(data.report), "rows_fingerprint": data.fingerprint, "inputs_hash": inputs_hash,
        "base": {"name_or_path": recipe.model_path(), "quantization": m.quantization, "dtype": m.dtype,
                 "identity": runfolder.model_identity(m.model_dump(mode="json"))["name_or_path"]},
        "starts_from": None if prev_adapter is None else {"stage": recipe.stages[i - 1].name,
                                                          "adapter_hash": runfolder.adapter_hash(prev_adapter)},
        "versions": versions(),
        "trained_in": {"run_dir": str(Path(run_dir).resolve()), "run_id": run_id, "recipe": recipe.name,
                       "host": socket.gethostname()},
    }


def adapter_artifact(recipe_name: str, stage: str, adapter_dir: Path) -> tuple[str, list[Path]]:
    """A stage's adapter as a W&B artifact: its name and files (weights, adapter config, lineage.json)."""
    files = [Path(adapter_dir) / f for f in (*runfolder.ADAPTER_FILES, LINEAGE)]
    return tracking.artifact_name(recipe_name, stage, "adapter"), [f for f in files if f.is_file()]


def record_trained(recipe, record: dict, adapter_dir: Path, prev_adapter: Path | None) -> dict:
    """A stage just trained (inside its W&B run): its lineage sealed beside the adapter and, with tracking on,
    logged as the run's adapter artifact. Returns the record."""
    sealed = seal_adapter(record, adapter_dir)
    previous = None
    if prev_adapter is not None:
        previous = adapter_artifact(recipe.name, sealed["starts_from"]["stage"], prev_adapter)
    name, files = adapter_artifact(recipe.name, sealed["stage"], adapter_dir)
    tracking.log_adapter(recipe.tracking.wandb, name=name, files=files, lineage=sealed, data=sealed["data"],
                         previous=previous)
    return sealed


def kept_stage(recipe, i: int, data, prev_adapter: Path | None, run_dir: Path, run_id: str, entry: dict) -> dict:
    """The lineage of a stage not trained now: done and unchanged, or reused from the shared store (its record
    names the run it was trained in). A stage finished before prefopt kept lineage, or whose adapter no longer has
    the hash its record names, gets a record now, which says so."""
    adapter_dir = run_dir / "stages" / recipe.stage_dirname(i) / "adapter"
    found = read_lineage(adapter_dir)
    if found is not None and found.get("adapter_hash") == runfolder.adapter_hash(adapter_dir):
        return found
    record = stage_record(recipe, i, data, prev_adapter, entry["inputs_hash"], run_dir, run_id)
    if entry.get("reused_from"):
        record["trained_in"] = {"run_dir": entry["reused_from"]}
    record.update(versions=None, created_at=entry.get("ended_at"),
                  note="recorded after training (no record, or one of another adapter, was beside it): the "
                       "library versions it was trained with are unknown")
    return seal_adapter(record, adapter_dir)


def record_merge(run_dir: Path, manifest: dict, index: int, out_dir: Path, report: dict) -> dict:
    """A merged model's lineage (the records of stages 0..index, then the merged files), written beside it."""
    stages = []
    for s in manifest["stages"][: index + 1]:
        adapter_dir = Path(run_dir) / s["adapter"]
        stages.append(read_lineage(adapter_dir) or {"stage": s["name"], "adapter_hash": runfolder.adapter_hash(
            adapter_dir), "note": "no lineage record beside this adapter (trained before prefopt kept them)"})
    merged_in = {"run_dir": str(Path(run_dir).resolve()), "run_id": manifest.get("run_id"),
                 "recipe": manifest.get("recipe_name")}
    return seal_merged(stages, out_dir, report, merged_in=merged_in, versions=versions())


def log_merge(recipe, run_dir: Path, run_id: str, entry: dict, out_dir: Path, record: dict, *,
              rollback: bool) -> None:
    """With tracking on, the merged model as a model artifact of a merge run in the run's W&B group, using the
    adapter of stage `entry` (its run.json entry)."""
    suffix = f"-{entry['name']}" if rollback else ""
    tracking.log_merged(recipe.tracking.wandb, run_dir=Path(run_dir),
                        group=tracking.group_of(recipe.tracking.wandb, recipe.name, run_id),
                        name=f"{recipe.name}/merge{suffix}",
                        artifact=tracking.artifact_name(recipe.name, f"merged{suffix}"),
                        files=[Path(out_dir) / f for f in MERGE_FILES if (Path(out_dir) / f).is_file()],
                        lineage=record,
                        adapter=adapter_artifact(recipe.name, entry["name"], Path(run_dir) / entry["adapter"]))
