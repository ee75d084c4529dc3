"""The evaluation of a run's adapters: held-out metrics, MMLU delta (lm-evaluation-harness), completions side by
side, the eval log and its gates.

`evaluate_run(run_dir, ...)` takes values, not the Recipe: the eval section, how the base is loaded, the adapter
settings, and each stage's adapter and held-out rows. It loads the 4-bit base ONCE per adapter through prefopt's
own loading code (prefopt.models.load_model), scores the base with the adapter disabled and the tuned model with it
enabled, on the same items, and writes runs/<name>/eval/.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..cachedir import cache_root
from ..config import UNPAIRED_TYPES
from ..models import ModelSpec, base_view, load_model
from ..runs import folder as runfolder
from ..tracking import log_eval
from . import completions as comp
from . import log as elog
from . import mmlu as mmlu_mod
from .heldout import preference_metrics, sft_metrics, unpaired_metrics


@dataclass
class StageEval:
    """One stage as the evaluation sees it."""

    name: str
    type: str
    adapter: Path
    eval_rows: list  # held-out rows (dicts), as the stage evaluated on
    metrics: dict  # the stage's own final metrics (run.json)
    files: list = field(default_factory=list)  # its data files
    train_rows: int = 0


def cache_dir() -> Path:
    return cache_root() / "eval"


def _load(spec: ModelSpec, adapter: Path):
    _, model, tokenizer = load_model(spec, adapter=adapter, trainable=False)
    return model, tokenizer


def _mmlu(model, tok, cfg, spec: ModelSpec, run_dir: Path, seed: int, echo) -> dict:
    """Base (cached per base model + eval data) and tuned MMLU items, paired."""

    m = cfg.mmlu
    data_fp = mmlu_mod.data_fingerprint(m.path, m.num_fewshot, m.limit)
    # the base's result depends on the base and the items/prompts, not on the seed (few-shot examples are the
    # first n of dev, choices are scored by log-likelihood): a sweep over seeds or betas reuses it
    key = hashlib.sha256(json.dumps([spec.identity(), data_fp]).encode()).hexdigest()[:16]
    cached = [cache_dir() / f"mmlu-base-{key}.json", run_dir / runfolder.EVAL / "mmlu_base.json"]
    base = None
    for p in cached:
        try:
            got = json.loads(p.read_text())
            if got.get("key") == key:
                base, from_cache = got["items"], p
                break
        except (OSError, json.JSONDecodeError, KeyError, AttributeError):
            continue
    kw = dict(path=m.path, num_fewshot=m.num_fewshot, limit=m.limit, batch_size=m.batch_size, seed=seed)
    if base is None:
        how = "its initial adapter on the rewritten base" if model.__dict__.get("_prefopt_initial_adapter") else \
            "adapter disabled"
        echo(f"prefopt: eval: MMLU ({m.path}, {m.num_fewshot}-shot) on the base ({how})")
        with base_view(model):
            base = mmlu_mod.score(model, tok, **kw)
        blob = json.dumps({"key": key, "model": spec.identity(), "data": data_fp, "items": base})
        for p in cached:
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                runfolder.write_atomic(p, blob)
            except OSError:  # a read-only home: the run folder's copy still serves reruns
                pass
        cached_from = None
    else:
        cached_from = str(from_cache)
        echo(f"prefopt: eval: MMLU base result from the cache ({from_cache})")
    echo("prefopt: eval: MMLU on the tuned model")
    tuned = mmlu_mod.score(model, tok, **kw)
    pair = mmlu_mod.paired(base, tuned)
    b, t = mmlu_mod.summary(base), mmlu_mod.summary(tuned)
    per_subject = {s: {"base": b["per_subject"][s]["acc"], "tuned": t["per_subject"][s]["acc"],
                       "n": t["per_subject"][s]["n"]} for s in t["per_subject"]}
    return {"path": m.path, "num_fewshot": m.num_fewshot, "limit": m.limit, "base_key": key,
            "base_cached_from": cached_from,
            "base": {"acc": b["acc"], "n": b["n"]}, "tuned": {"acc": t["acc"], "n": t["n"]},
            "delta_points": pair["delta_points"], "paired_stderr": pair["paired_stderr"],
            "per_subject": per_subject, "_items": pair["items"]}


def _heldout(model, tok, st: StageEval, seed: int) -> dict:
    if st.type == "sft":
        return sft_metrics(model, tok, st.eval_rows, st.metrics, seed=seed)
    if st.type in UNPAIRED_TYPES:
        return unpaired_metrics(model, tok, st.eval_rows, st.metrics)
    return preference_metrics(model, tok, st.eval_rows, st.metrics)


def evaluate_run(run_dir: Path, *, cfg, spec: ModelSpec, stages: list[StageEval], seed: int, run_id: str,
                 recipe_hash: str, config: dict, inputs_hash: str, adapter_hash: str, wandb=None, group: str = "",
                 echo=print) -> dict:
    """Evaluate the final adapter (and every stage's, with after: every_stage); write eval/; return the log."""
    import torch

    run_dir = Path(run_dir)
    out = run_dir / runfolder.EVAL
    out.mkdir(parents=True, exist_ok=True)
    old = runfolder.read_eval_log(run_dir) or {}
    final = stages[-1]
    heldout, per_stage, mmlu_result, rows = {}, {}, None, []
    todo = stages if cfg.after == "every_stage" else [final]
    for st in todo:
        echo(f"prefopt: eval: {st.name} ({st.type}) adapter{' (final)' if st is final else ''}")
        model, tok = _load(spec, st.adapter)
        try:
            if st is final:
                for s in stages:  # the final model on every stage's held-out rows
                    heldout[s.name] = {**_heldout(model, tok, s, seed), "eval_rows": len(s.eval_rows)}
                if cfg.mmlu is not None:
                    mmlu_result = _mmlu(model, tok, cfg, spec, run_dir, seed, echo)
                if cfg.completions.n > 0:
                    prompts = (comp.read_prompts(cfg.completions.prompts) if cfg.completions.prompts else
                               [comp.prompt_of(r) for r in final.eval_rows])[: cfg.completions.n]
                    if len(prompts) < cfg.completions.n:
                        echo(f"prefopt: eval: warning: only {len(prompts)} prompts for completions.n "
                             f"{cfg.completions.n}")
                    echo(f"prefopt: eval: {len(prompts)} completions, base and tuned")
                    rows = comp.side_by_side(model, tok, prompts, max_new_tokens=cfg.completions.max_new_tokens,
                                             seed=seed)
            else:
                entry = {"heldout": {**_heldout(model, tok, st, seed), "eval_rows": len(st.eval_rows)}}
                if cfg.mmlu is not None:
                    r = _mmlu(model, tok, cfg, spec, run_dir, seed, echo)
                    entry["mmlu"] = {k: v for k, v in r.items() if not k.startswith("_")}
                per_stage[st.name] = entry
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    datasets = _datasets_used(cfg, stages)
    if mmlu_result is not None:
        items = mmlu_result.pop("_items")
        runfolder.write_atomic(out / "mmlu_items.jsonl", "".join(json.dumps(i) + "\n" for i in items))
    if cfg.completions.n > 0:
        runfolder.write_atomic(out / "completions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        runfolder.write_atomic(out / "completions.md", comp.to_markdown(rows, f"Completions: {run_dir.name}"))

    gates = elog.check_gates(cfg.gates, mmlu=mmlu_result, heldout=heldout, last_preference=_last_preference(stages),
                             last_stage=final.name)
    # a signed review is never deleted: one that read another adapter is kept, marked stale
    reviews = [r if r.get("adapter_hash") == adapter_hash else {**r, "stale": True} for r in old.get("reviews", [])]
    log = {
        "run_id": run_id, "recipe_hash": recipe_hash, "inputs_hash": inputs_hash, "adapter_hash": adapter_hash,
        "created_at": elog.now(), "versions": elog.versions(), "datasets": datasets, "config": config,
        "final_stage": final.name,
        "stage_metrics": {s.name: s.metrics for s in stages},
        "heldout": heldout, "per_stage": per_stage, "mmlu": mmlu_result,
        "completions": ({"n": len(rows), "file": f"{runfolder.EVAL}/completions.jsonl"} if cfg.completions.n > 0
                        else None),
        "gates": gates, "passed": all(g["verdict"] == "pass" for g in gates), "reviews": reviews,
    }
    runfolder.write_eval_log(run_dir, log)
    if wandb is not None:
        log_eval(wandb, run_dir=run_dir, group=group, name=f"{run_dir.name}/eval", log=log, completions=rows)
    return log


def _datasets_used(cfg, stages: list[StageEval]) -> list[dict]:
    """Every file the evaluation read, hashed, for the eval log."""
    datasets = []
    for st in stages:
        for k, f in enumerate(st.files):
            datasets.append(elog.dataset_entry(f"stages.{st.name}.{'data' if k == 0 else 'eval_data'}", f,
                                               train_rows=st.train_rows, eval_rows=len(st.eval_rows)))
    if cfg.mmlu is not None:
        for f in mmlu_mod.files_used(cfg.mmlu.path, cfg.mmlu.num_fewshot):
            datasets.append(elog.dataset_entry(f"mmlu.{f.parent.name}", str(f), rows=mmlu_mod.count_rows(f)))
        if not mmlu_mod.is_local(cfg.mmlu.path):
            datasets.append(elog.dataset_entry("mmlu", cfg.mmlu.path))
    if cfg.completions.prompts:
        datasets.append(elog.dataset_entry("completions.prompts", cfg.completions.prompts))
    return datasets


def _last_preference(stages) -> str | None:
    prefs = [s.name for s in stages if s.type != "sft"]
    return prefs[-1] if prefs else None


def judge_again(run_dir: Path, gates, stages: list[tuple[str, str]]) -> tuple[dict, bool]:
    """Judge an existing eval log's figures against (new) gates, without evaluating again; returns the log and
    whether it changed (it is written only then). `stages` is the recipe's (name, type) list."""
    import copy

    log = runfolder.read_eval_log(run_dir)
    before = copy.deepcopy(log)
    pref = [n for n, t in stages if t != "sft"]
    log["gates"] = elog.check_gates(gates, mmlu=log.get("mmlu"), heldout=log.get("heldout") or {},
                                    last_preference=pref[-1] if pref else None, last_stage=stages[-1][0])
    log["passed"] = all(g["verdict"] == "pass" for g in log["gates"])
    log["config"]["eval"]["gates"] = gates.model_dump(mode="json")
    if log == before:
        return log, False
    runfolder.write_eval_log(run_dir, log)
    return log, True


def describe(log: dict) -> str:
    """One line: the figures and the verdict."""
    parts = []
    m = log.get("mmlu")
    if m:
        parts.append(f"MMLU base {m['base']['acc']:.3f} -> tuned {m['tuned']['acc']:.3f} "
                     f"({m['delta_points']:+.2f} ± {m['paired_stderr']:.2f} points, n={m['tuned']['n']})")
    for name, h in (log.get("heldout") or {}).items():
        if "win_rate_vs_base" in h:
            parts.append(f"{name}: win rate vs base {h['win_rate_vs_base']:.2f}")
        if "perplexity" in h:
            parts.append(f"{name}: held-out perplexity {h['perplexity']:.2f}")
    verdict = "gates PASSED" if log.get("passed") else "gates FAILED: " + runfolder.gate_line(
        runfolder.failed_gates(log))
    return "; ".join(parts + [verdict])
