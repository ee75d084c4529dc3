"""The eval log (eval/eval_log.json): what was evaluated, on what, with which result, and who approved it.

{run_id, recipe_hash, created_at, versions {prefopt, torch, ...}, datasets [{role, path, sha256, rows, ...}],
 config (the resolved recipe), heldout {stage: {...}}, per_stage {stage: {mmlu, heldout}} (after: every_stage),
 mmlu {path, num_fewshot, limit, base {acc, n}, tuned {acc, n}, delta_points, paired_stderr, per_subject},
 completions {n, file}, gates [{name, what, threshold, value, verdict}], passed, reviews [{reviewer, verdict,
 note, at}]}
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path

from ..errors import PrefoptError
from ..runs import folder as runfolder
from ..version import __version__

LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "lm_eval", "accelerate")
VERDICTS = ("approve", "reject")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"prefopt": __version__}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_entry(role: str, path: str, **counts) -> dict:
    p = Path(path)
    return {"role": role, "path": str(path), "sha256": sha256(p) if p.is_file() else None,
            **({} if p.is_file() else {"note": "not a local file (a hub id): no content hash"}), **counts}


def check_gates(gates, *, mmlu: dict | None, heldout: dict, last_preference: str | None, last_stage: str) -> list[dict]:
    """Each gate that is set: the limit as the recipe wrote it (threshold, and `limit` in words), the figure it
    judges and the verdict (pass / fail / missing: the figure was not measured, which fails too: a gate nobody
    could check does not pass)."""
    out = []

    def judge(name, what, threshold, limit, value, ok):
        verdict = "missing" if value is None else ("pass" if ok(value) else "fail")
        out.append({"name": name, "what": what, "threshold": threshold, "limit": limit, "value": value,
                    "verdict": "fail" if verdict == "missing" else verdict,
                    **({"note": "not measured"} if value is None else {})})

    def at_least(t):
        return f">= {t:g}"

    pref = (heldout.get(last_preference) or {}) if last_preference else {}
    where = last_preference or "no preference stage"
    if gates.max_mmlu_drop is not None:
        delta = mmlu.get("delta_points") if mmlu else None
        drop = None if delta is None else -delta  # points lost against the base (negative: it gained)
        judge("max_mmlu_drop", "MMLU drop in points (base - tuned)", gates.max_mmlu_drop,
              f"drop <= {gates.max_mmlu_drop:g} points", drop, lambda v: v <= gates.max_mmlu_drop)
    if gates.min_reward_accuracy is not None:
        judge("min_reward_accuracy", f"held-out reward accuracy ({where})", gates.min_reward_accuracy,
              at_least(gates.min_reward_accuracy), pref.get("reward_accuracy"),
              lambda v: v >= gates.min_reward_accuracy)
    if gates.min_reward_margin is not None:
        judge("min_reward_margin", f"held-out mean reward margin ({where})", gates.min_reward_margin,
              at_least(gates.min_reward_margin), pref.get("reward_margin"), lambda v: v >= gates.min_reward_margin)
    if gates.min_task_delta is not None:
        delta = (heldout.get(last_stage) or {}).get("task_delta")
        judge("min_task_delta", f"held-out task delta ({last_stage})", gates.min_task_delta,
              at_least(gates.min_task_delta), delta, lambda v: v >= gates.min_task_delta)
    return out


def add_review(run_dir: Path, *, reviewer: str, verdict: str, note: str | None = None) -> dict:
    """Append a dated review to the run's eval log; returns the entry."""
    if verdict not in VERDICTS:
        raise PrefoptError(f"--verdict must be approve or reject, got {verdict!r}")
    if not reviewer.strip():
        raise PrefoptError("--reviewer: give the reviewer's name")
    log = runfolder.read_eval_log(run_dir)
    if log is None:
        raise PrefoptError(f"{run_dir}: no eval/eval_log.json; evaluate the run first (prefopt eval {run_dir})")
    entry = {"reviewer": reviewer.strip(), "verdict": verdict, "note": note, "at": now(),
             "adapter_hash": log.get("adapter_hash")}
    log.setdefault("reviews", []).append(entry)
    runfolder.write_eval_log(run_dir, log)
    return entry
