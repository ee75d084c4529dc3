"""The run folder's format: what prefopt writes there, the manifest, atomic writes, temp clean-up, what "done"
means, and the content hashes of files and folders. It sits low in the flow (it imports the config, the errors and
the console only), so every step can use it.

runs/<name>/
  run.json                        manifest (version, recipe name and hash, run id; per stage: status, adapter,
                                  inputs hash, rows trained on, metrics, times; the merge's status and inputs hash)
  recipe.yaml                     resolved recipe: every default, absolute data/model paths, data hashes
  stages/NN-<name>/adapter/       PEFT adapter (safetensors, DoRA magnitude included) + tokenizer + lineage.json
  stages/NN-<name>/log_history.json
  eval/                           eval_log.json (hashes, config, metrics, gates, reviews), mmlu_items.jsonl,
                                  completions.jsonl / completions.md, mmlu_base.json (the base's cached result)
  report.html                     the run report (prefopt report rebuilds it from this folder alone)
  merged/                         the merged checkpoint, merge_report.json, lineage.json (recipe `merge:` or
                                  `prefopt merge`)
  merged-<stage>/                 an earlier stage's adapter merged (`prefopt merge RUN_DIR --stage NAME`)
  dropped/NN-<name>/              stages a later version of the recipe no longer has
  data/                           `prefopt data`: data.json, NN-<name>/ data reports and review samples
  cache/                          reference log-probs of this run (the shared store keeps a copy)
  wandb/  logs/                   W&B files; tracebacks of unexpected errors
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ..config import identity, looks_local
from ..console import log_dir
from ..errors import RunFolderError, option

MANIFEST = "run.json"
RECIPE = "recipe.yaml"
MERGED = "merged"
MERGE_REPORT = "merge_report.json"
EVAL = "eval"  # eval/eval_log.json, mmlu_items.jsonl, completions.jsonl/.md
EVAL_LOG = "eval_log.json"
REPORT = "report.html"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# Everything prefopt itself writes at the top of a run folder; `--fresh` removes these and nothing else.
DATA = "data"  # `prefopt data`: data/data.json, data/NN-name/{data_report.json, review_sample.*}
DATA_MANIFEST = "data.json"
OWNED = (MANIFEST, RECIPE, "stages", MERGED, "dropped", "wandb", "logs", DATA, "cache", EVAL, REPORT)


def run_dir_of(recipe_name: str, output_dir: str | Path | None = None) -> Path:
    """The run folder: output_dir when given, else runs/<recipe name>/ (relative to the current folder)."""
    return Path(output_dir) if output_dir else Path("runs") / recipe_name


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_if_changed(path: Path, text: str) -> bool:
    """Write (atomically) only when the file does not already hold `text`; returns whether it wrote."""
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic(path, text)
    return True


def read_manifest(run_dir: Path) -> dict | None:
    p = Path(run_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) else None


def adapter_hash(adapter_dir: Path | str) -> str:
    """The adapter's identity: its weights' and its config's content hashes."""
    return "-".join(file_hash(str(Path(adapter_dir) / f)) for f in ADAPTER_FILES)


def canonical_adapter_config(adapter_dir: Path) -> None:
    """Write adapter_config.json with its target_modules sorted: PEFT writes that set in Python's hash order, which
    differs between processes, so the same adapter trained twice would hash differently (and its next stage's
    inputs with it). The format stays PEFT's (indent 2, keys sorted)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    modules = config.get("target_modules") if isinstance(config, dict) else None
    if isinstance(modules, list) and modules != sorted(modules, key=str):
        config["target_modules"] = sorted(modules, key=str)
        write_atomic(path, json.dumps(config, indent=2, sort_keys=True))


def self_contained(recipe):
    """A copy of the recipe that runs from anywhere: local data and model paths made absolute, each local data
    file's content hash recorded (data.sha256 / eval_sha256, checked when the data is loaded)."""
    r = recipe.model_copy(deep=True)
    local = recipe.resolve(r.model.name_or_path)
    if local is not None:
        r.model.name_or_path = str(local)

    def pin(section, key, hkey):
        p = getattr(section, key)
        rp = recipe.resolve(p) if p and looks_local(p) else None
        if rp is not None and rp.is_file():
            setattr(section, key, str(rp))
            if hkey and getattr(section, hkey) is None:
                setattr(section, hkey, file_hash(str(rp)))

    for st in r.stages:
        if isinstance(st.data.path, str):
            pin(st.data, "path", "sha256")
        else:
            for src in st.data.path:
                pin(src, "path", "sha256")
        pin(st.data, "eval_path", "eval_sha256")
        q = st.data.quality
        q.decontaminate = [str(recipe.resolve(p) or p) if looks_local(p) else p
                           for p in q.decontaminate]
    if r.eval is not None:  # the eval's local files too (a hub id stays as written)
        if r.eval.mmlu is not None and (rp := recipe.resolve(r.eval.mmlu.path)) is not None:
            r.eval.mmlu.path = str(rp)
        if r.eval.completions.prompts and (rp := recipe.resolve(r.eval.completions.prompts)):
            r.eval.completions.prompts = str(rp)
    return r


def stage_identity(stage: dict) -> dict:
    """A stage section for its inputs hash: local paths left out (the data step's fingerprint of the rows the
    stage trains on stands for their contents), so a project moved or cloned elsewhere keeps its finished stages."""

    def local(v):
        return isinstance(v, str) and looks_local(v)

    # the content hashes are checks of the files, not inputs: the fingerprint of the rows stands for the content
    data = {k: v for k, v in stage.get("data", {}).items()
            if not (k in ("path", "eval_path") and local(v)) and k not in ("sha256", "eval_sha256")}
    if isinstance(data.get("path"), list):
        data["path"] = [{k: v for k, v in src.items() if not (k == "path" and local(v)) and k != "sha256"}
                        for src in data["path"]]
    if "quality" in data:  # the filters' effect is in the rows' fingerprint, except the reference filter's (applied
        # when the stage starts, after the hash)
        data["quality"] = {"reference_filter": data["quality"].get("reference_filter")}
    return identity(stage.get("type", ""), {**stage, "data": data})


def content_hash(path: str) -> str | None:
    """What a local file or folder holds (every file's name and bytes); None for what is not local (a hub id)."""

    p = Path(path)
    if not p.exists():
        return None
    h = hashlib.sha256()
    for f in sorted([p] if p.is_file() else (x for x in p.rglob("*") if x.is_file())):
        h.update(f"{f.relative_to(p) if f != p else f.name}:".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def model_identity(model: dict) -> dict:
    """The model section for inputs hashes: a local folder stands for what is in it (small files by content,
    weight files by name and size), not for where it lies; a hub id stands for itself."""

    folder = Path(model["name_or_path"])
    if not folder.is_dir():
        return model
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            h.update(f"{p.name}:{size}:".encode())
            if size < (8 << 20):
                h.update(p.read_bytes())
            else:  # large weights: 64 evenly spaced 64 KiB samples (a fine-tune changes bytes all over the file)
                with open(p, "rb") as f:
                    for k in range(64):
                        f.seek(k * (size - 65536) // 63)
                        h.update(f.read(65536))
    return {**model, "name_or_path": "local:" + h.hexdigest()[:16]}


def run_folder_of(recipe_path, recipe_name: str) -> Path | None:
    """The run folder a recipe file belongs to (it is that folder's recipe.yaml), else None."""
    folder = Path(recipe_path).resolve().parent
    m = read_manifest(folder)
    if Path(recipe_path).name == RECIPE and m and m.get("recipe_name") == recipe_name:
        return folder
    return None


# .merged.tmp-<pid>, .merged.tmp-old-<pid>, .run.json.tmp-<pid>, .recipe.yaml.tmp-<pid>; .NN-name.tmp, .NN-name.old
_TEMP = re.compile(r"^\.[\w.-]+\.tmp(-old)?-\d+$|^\.\d\d+-[\w.-]+\.(tmp|old)$")


def _is_temp(name: str) -> bool:
    return bool(_TEMP.match(name))


def _owned(name: str) -> bool:
    return name in OWNED or _is_temp(name)


def is_run_folder(run_dir: Path) -> bool:
    """A folder prefopt wrote: a readable run.json, or nothing but what a run killed before its first manifest
    leaves (temp entries, an empty stages/), or what `prefopt data` wrote (data/data.json). Names alone (a user's own
    wandb/ or logs/) do not make one."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    if m is not None and "run_id" in m:
        return True
    entries = list(run_dir.iterdir())
    return bool(entries) and all(
        _is_temp(p.name) or (p.name == "stages" and p.is_dir() and not any(p.iterdir()))
        or (p.name == DATA and (p / DATA_MANIFEST).is_file()) for p in entries)


CHECKPOINT_DONE = "prefopt_checkpoint_complete"
STAGE_INPUTS = "inputs_hash"  # in a stage's temp folder: the inputs hash its checkpoints belong to


def stage_tmp(stage_dir: Path) -> Path:
    """A stage's temp folder: written while it trains (checkpoints included), renamed into place when done."""
    return stage_dir.with_name(f".{stage_dir.name}.tmp")


def mark_checkpoint(path: Path) -> None:
    """A checkpoint the trainer has finished writing (written after it, so a kill mid-write leaves none)."""
    if path.is_dir():
        write_atomic(path / CHECKPOINT_DONE, "")


def last_checkpoint(stage_tmp: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint in a stage's temp folder, and its optimizer step."""
    found = []
    for p in (Path(stage_tmp) / "trainer").glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and (p / CHECKPOINT_DONE).is_file():
            found.append((int(step), p))
    return (max(found)[1], max(found)[0]) if found else None


def resumable(stage_tmp: Path, inputs_hash: str) -> tuple[Path, int] | None:
    """The checkpoint to resume a stage from: the newest complete one, if its inputs are the stage's now."""
    f = Path(stage_tmp) / STAGE_INPUTS
    if not f.is_file() or f.read_text().strip() != inputs_hash:
        return None
    return last_checkpoint(stage_tmp)


def _holds_checkpoint(p: Path) -> bool:
    return p.is_dir() and p.name.endswith(".tmp") and p.parent.name == "stages" and last_checkpoint(p) is not None


def clean_temp(run_dir: Path) -> list[str]:
    """Remove temp folders and files an interrupted run or merge left behind (not a stage's temp folder holding a
    checkpoint: the stage resumes from it, or removes it when its inputs changed); returns their names."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "stages"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _is_temp(p.name) and not _holds_checkpoint(p):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(str(p.relative_to(run_dir)))
    return removed


def check_output_dir(run_dir: Path, *, recipe_name: str, stages: list[tuple[str, str]], fresh: bool) -> None:
    """Refuse an output folder that holds something other than this recipe's run (before anything is written).

    `stages` is the recipe's (name, type) list. Another recipe's run is refused unless --fresh; a folder that is
    not a prefopt run folder is refused always (even --fresh deletes only what prefopt writes).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: exists and is not a folder; choose another {option('output_dir', 'DIR')}")
    if not any(run_dir.iterdir()):
        return
    if not is_run_folder(run_dir):
        what = f"{option('fresh')} deletes only a prefopt run folder's own files, so nothing was deleted" \
            if fresh else \
            "prefopt writes its run into an empty folder or a previous run of the same recipe"
        raise RunFolderError(f"{run_dir}: not a prefopt run folder (no run.json, and it holds other files); {what}; "
                             f"choose another {option('output_dir', 'DIR')}")
    if fresh:
        return
    old = read_manifest(run_dir) or {}
    why = _different_recipe(old, recipe_name, stages)
    if why:
        raise RunFolderError(f"{run_dir} holds another recipe's run ({why}); pass {option('fresh')} to replace it, or "
                             f"{option('output_dir', 'DIR')} to write this run elsewhere")


def _different_recipe(old: dict, recipe_name: str, stages: list[tuple[str, str]]) -> str | None:
    if not old:
        return None
    if old.get("recipe_name") not in (None, recipe_name):
        return f"recipe '{old['recipe_name']}', this one is '{recipe_name}'"
    before = [(s.get("name"), s.get("type")) for s in old.get("stages", [])]
    if not before:
        return None
    types = dict(before)
    for name, typ in stages:
        if name in types and types[name] != typ:
            return f"stage '{name}' was {types[name]}, now {typ}"
    kept = [n for n, _ in before if n in dict(stages)]
    if not kept:
        return f"stages {', '.join(n for n, _ in before)}; this recipe has {', '.join(n for n, _ in stages)}"
    if kept != [n for n, _ in stages if n in types]:
        return f"stages were in the order {', '.join(kept)}"
    return None


def clear_for_fresh(run_dir: Path) -> None:
    """--fresh: remove what prefopt writes in a run folder (check_output_dir has refused anything else)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if _owned(p.name) or (p.name.startswith(f"{MERGED}-") and (p / MERGE_REPORT).is_file()):  # merged-<stage>
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def move_dropped_stages(run_dir: Path, keep: set[str]) -> list[str]:
    """Stage folders the recipe no longer has (by folder name) leave stages/ for dropped/; returns their names."""
    stages_dir = Path(run_dir) / "stages"
    moved = []
    if not stages_dir.is_dir():
        return moved
    for p in sorted(stages_dir.iterdir()):
        if p.name.startswith(".") or p.name in keep or not p.is_dir():
            continue
        dest = Path(run_dir) / "dropped" / p.name
        dest.parent.mkdir(exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(p, dest)
        moved.append(p.name)
    return moved


def stage_done(entry: dict | None, inputs_hash: str, stage_dir: Path) -> bool:
    """A stage is done when run.json says so with the same inputs, and its adapter files are in place."""
    return bool(entry) and entry.get("status") == "done" and entry.get("inputs_hash") == inputs_hash and all(
        (stage_dir / "adapter" / f).is_file() for f in ADAPTER_FILES)


def merge_done(run_dir: Path, manifest: dict, key: str, *, verify: bool) -> dict | None:
    """merged/ counts as done only when run.json says the merge is done with these inputs AND merged/'s own
    report agrees (same inputs hash; verified and passed when verification is asked). Returns the report."""
    m = manifest.get("merge") or {}
    if m.get("status") != "done" or m.get("inputs_hash") != key:
        return None
    path = Path(run_dir) / MERGED / MERGE_REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(report, dict) or report.get("inputs_hash") != key:
        return None
    v = report.get("verification")
    if verify and not (v and v.get("passed")):
        return None
    return report


def read_eval_log(run_dir: Path) -> dict | None:
    p = Path(run_dir) / EVAL / EVAL_LOG
    try:
        log = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return log if isinstance(log, dict) else None


def write_eval_log(run_dir: Path, log: dict) -> None:
    (Path(run_dir) / EVAL).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(run_dir) / EVAL / EVAL_LOG, json.dumps(log, indent=2))


def failed_gates(log: dict | None) -> list[dict]:
    """The gates an eval log records as failed ([] when there is no log or every gate passed)."""
    if not log:
        return []
    return [g for g in log.get("gates", []) if g.get("verdict") == "fail"]


def gate_limit(g: dict) -> str:
    """A gate's limit as the recipe wrote it: 'drop <= 25 points', '>= 0.6'."""
    if "limit" in g:
        return g["limit"]
    return f">= {fmt(g['threshold'])}"  # eval logs written before the limit was recorded


def gate_line(gates: list[dict]) -> str:
    """One line naming each failed gate and its figures."""
    return "; ".join(f"gate {g['name']} failed: {g['what']} {fmt(g['value'])}, needs {gate_limit(g)}"
                     + (" (not measured)" if g.get("value") is None else "") for g in gates)


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def log_paths(run_dir: Path | None) -> list[Path]:
    """Where an unexpected error's traceback may go, in order: the run folder's logs/ (when it is a run folder), then
    the user's log folder (prefopt.console.log_dir: the user cache, else the temp folder). The caller takes the
    first it can write."""
    import time

    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    out = []
    try:
        if run_dir is not None and Path(run_dir).is_dir() and is_run_folder(Path(run_dir)):
            out.append(Path(run_dir) / "logs" / name)
    except OSError:
        pass
    return out + [log_dir() / name]


def file_hash(label: str) -> str:
    """Content hash of a local data file (hub ids hash their name): the first 16 hex digits of sha256_of."""
    return sha256_of(label)[:16]


def sha256_of(label: str) -> str:
    """The full sha256 of a local file (hub ids: of their name), for reports."""
    p = Path(label)
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(label.encode())
    return h.hexdigest()

