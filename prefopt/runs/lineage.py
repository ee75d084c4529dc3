"""Lineage records: what an adapter or a merged model was made from, beside its weights (lineage.json) and in
run.json (each stage's entry and the merge's, "lineage").

  stages/NN-<name>/adapter/lineage.json
      {kind: "adapter", stage, type, index, data: [{role, path, sha256}], rows_fingerprint, inputs_hash,
       base: {name_or_path, identity, quantization, dtype}, starts_from: null (the base) | {stage, adapter_hash},
       adapter_hash, versions: {prefopt, torch, transformers, trl, peft, ...}, trained_in: {run_dir, run_id, recipe,
       host}, created_at}
  merged/lineage.json, merged-<stage>/lineage.json
      {kind: "merged", stage, adapter_hash, stages: [the lineage of each stage up to it], merged_hash,
       merged_files: {file: hash}, merge: {base_mode, out_dtype, verified}, versions, merged_in, created_at}

The chain reads: data files (sha256) -> the stage's inputs hash -> its adapter hash -> the next stage's starts_from
-> ... -> the merged hash. The adapter hash is prefopt.runs.folder.adapter_hash (weights and adapter config), so
lineage.json, written beside them, never changes the hash it records. Record builders take values (the versions,
the run's identity); prefopt.steps.lineage gathers them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .folder import adapter_hash, file_hash, write_atomic
from .records import now

LINEAGE = "lineage.json"
FORMAT = 1  # the record's format: a reader meets older records with a lower number
# the files that make a merged model what it is (the weights and the config: the tokenizer and card do not)
MERGED_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json")


def data_files(report: dict) -> list[dict]:
    """The data files a stage read, with the sha256 the data step computed when it read them (a hub id: of its
    name), from the stage's data report."""
    out = [{"role": "data", "path": s["path"], "sha256": s["sha256"]} for s in report.get("sources", [])]
    ev = report.get("eval_source")
    if ev:
        out.append({"role": "eval_data", "path": ev["path"], "sha256": ev["sha256"]})
    for d in out:
        if not Path(d["path"]).is_file():
            d["note"] = "not a local file (a hub id): the sha256 of its name, not of its content"
    return out


def read_lineage(folder: Path) -> dict | None:
    """The lineage record beside an adapter or a merged model, or None (none, or unreadable)."""
    try:
        record = json.loads((Path(folder) / LINEAGE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def seal_adapter(record: dict, adapter_dir: Path) -> dict:
    """A stage's record completed with its adapter's hash and the time, written beside the adapter; returned."""
    sealed = {"format": FORMAT, "kind": "adapter", **record, "adapter_hash": adapter_hash(Path(adapter_dir)),
              "created_at": record.get("created_at") or now()}
    write_atomic(Path(adapter_dir) / LINEAGE, json.dumps(sealed, indent=2))
    return sealed


def merged_hash(folder: Path) -> tuple[str, dict]:
    """(hash of the merged model, {file: hash}): its weight files and config, each by content (16 hex digits of
    sha256), the hash over their names and hashes."""
    folder = Path(folder)
    files = sorted({p.name for pattern in MERGED_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    hashes = {name: file_hash(str(folder / name)) for name in files}
    h = hashlib.sha256("".join(f"{name}:{hashes[name]}\n" for name in files).encode())
    return h.hexdigest()[:16], hashes


def seal_merged(stages: list[dict], out_dir: Path, report: dict, *, merged_in: dict, versions: dict) -> dict:
    """The merged model's record: the chain of stage records up to the merged adapter, then the merged files;
    written to out_dir/lineage.json and returned."""
    digest, files = merged_hash(out_dir)
    v = report.get("verification") or None
    record = {
        "format": FORMAT, "kind": "merged", "stage": stages[-1]["stage"] if stages else None,
        "adapter_hash": report.get("adapter_hash"), "stages": stages, "merged_hash": digest, "merged_files": files,
        "merge": {"base": report.get("base"), "base_mode": report.get("base_mode"),
                  "out_dtype": report.get("out_dtype"), "verified": None if v is None else bool(v.get("passed"))},
        "versions": versions, "merged_in": merged_in, "created_at": now(),
    }
    write_atomic(Path(out_dir) / LINEAGE, json.dumps(record, indent=2))
    return record
