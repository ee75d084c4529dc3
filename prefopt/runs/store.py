"""Work kept across runs: the reference log-prob cache and the store of finished stages.

Both are content-addressed: an entry is found by a hash of everything that determines it, never by a path or a
run name, so a rerun, a resume, a beta sweep in another run folder or another project finds it, and any change to
what it depends on misses it.

  <run>/cache/ref_logps/<key>/{train,eval}.safetensors     per run folder
  <cache_dir>/ref_logps/<key>/...                          shared (recipe cache_dir, PREFOPT_CACHE_DIR, or
                                                           ~/.cache/prefopt)
  <cache_dir>/stages/<inputs hash>/                        finished stages: adapter/, log_history.json,
                                                           data_report.json, stage.json
Clear the shared cache with `rm -rf ~/.cache/prefopt` (or the folder you chose); `cache_dir: off` in a recipe
turns sharing off (the run folder's own reference cache is kept).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..cachedir import CACHE_ENV, cache_root
from . import folder as runfolder

REF_LOGPS = "ref_logps"
STAGES = "stages"
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def shared_dir(setting: str | None) -> Path | None:
    """The shared cache folder: the recipe's cache_dir, else $PREFOPT_CACHE_DIR, else ~/.cache/prefopt; None when
    the recipe says off."""
    if setting == "off" or (not setting and os.environ.get(CACHE_ENV, "").lower() == "off"):
        return None
    return Path(setting).expanduser() if setting else cache_root()


def _publish(tmp: Path, dest: Path) -> None:
    """Move a finished temp folder into place (a concurrent writer of the same entry wrote the same content)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


class RefLogpsCache:
    """Reference log-probs of one dataset split under one key; looked up in the run folder, then the shared dir."""

    def __init__(self, key: str, folders: list[Path], columns=COLUMNS):
        self.key = key
        self.folders = [Path(f) / REF_LOGPS / key for f in folders]
        self.columns = tuple(columns)

    def load(self, split: str, rows: int) -> dict | None:
        from safetensors.torch import load_file

        for folder in self.folders:
            f = folder / f"{split}.safetensors"
            if f.is_file():
                cols = load_file(str(f))
                if set(cols) == set(self.columns) and all(len(v) == rows for v in cols.values()):
                    return cols
        return None

    def save(self, split: str, cols: dict) -> None:
        from safetensors.torch import save_file

        for folder in self.folders:
            tmp = folder.with_name(f".{folder.name}.{split}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in cols.items()}, str(tmp / f"{split}.safetensors"))
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f"{split}.safetensors", folder / f"{split}.safetensors")
            shutil.rmtree(tmp, ignore_errors=True)


STAGE_FILES = ("adapter", "log_history.json", "data_report.json", "review_sample.jsonl", "review_sample.md",
               "data_dropped.jsonl", "data_scores.jsonl")


def store_stage(store: Path | None, inputs_hash: str, stage_dir: Path, entry: dict) -> None:
    """Keep a finished stage's outputs under its inputs hash (a copy; the run folder keeps its own)."""
    if store is None:
        return
    dest = Path(store) / STAGES / inputs_hash
    if (dest / "stage.json").is_file():
        return
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for name in STAGE_FILES:
        src = stage_dir / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    meta = {k: entry.get(k) for k in ("name", "type", "metrics", "started_at", "ended_at", "data", "diagnostics")}
    (tmp / "stage.json").write_text(json.dumps({**meta, "from": str(stage_dir)}, indent=2))
    _publish(tmp, dest)


def stored_stage(store: Path | None, inputs_hash: str) -> Path | None:
    if store is None:
        return None
    dest = Path(store) / STAGES / inputs_hash
    return dest if (dest / "stage.json").is_file() and (dest / "adapter" / "adapter_config.json").is_file() else None

@dataclass
class StageDecision:
    """What to do with a stage, read from the run folder and the shared store."""

    done: bool  # done with these inputs (maybe just reused from the store): nothing to train
    record: dict | None  # the stage's run.json entry (the stored stage's, when reused)
    reused_from: str | None = None  # the run folder the stored stage was trained in
    resume: tuple[Path, int] | None = None  # the checkpoint to resume from, and its step
    stale: bool = False  # there are checkpoints, of other inputs


def decide_stage(recorded: dict | None, inputs: str, stage_dir: Path, store, model_path: str | None = None
                 ) -> StageDecision:
    """Done (here, or reused from the shared store), resumable, or to be trained from the start."""
    tmp = runfolder.stage_tmp(stage_dir)
    resume = runfolder.resumable(tmp, inputs)
    stored = stored_stage(store, inputs) if resume is None else None
    if not runfolder.stage_done(recorded, inputs, stage_dir) and stored is not None:
        reuse_stored(stored, stage_dir, model_path)
        meta = json.loads((stored / "stage.json").read_text())
        reused = meta.get("from")
        recorded = {**meta, "status": "done", "inputs_hash": inputs, "reused_from": reused}
        if runfolder.stage_done(recorded, inputs, stage_dir):  # (a stored stage that lost a file is trained again)
            return StageDecision(True, recorded, reused_from=reused)
    if runfolder.stage_done(recorded, inputs, stage_dir):
        return StageDecision(True, recorded)
    return StageDecision(False, recorded, resume=resume,
                         stale=resume is None and runfolder.last_checkpoint(tmp) is not None)


def reuse_stored(stored: Path, stage_dir: Path, model_path: str | None = None) -> None:
    """A stage finished elsewhere with the same inputs: its files, copied into place atomically. The adapter's
    record of its base names this run's model (the same content, by the inputs hash; maybe another path)."""
    tmp = runfolder.stage_tmp(stage_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(stored, tmp, ignore=shutil.ignore_patterns("stage.json"))
    info = tmp / "adapter" / "prefopt_base.json"
    if model_path and info.is_file():
        meta = json.loads(info.read_text())
        meta["name_or_path"] = model_path
        info.write_text(json.dumps(meta, indent=2))
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    os.replace(tmp, stage_dir)
