"""merged/README.md: the model card of a merged run, with the eval results as model-index metadata
(huggingface_hub's ModelCardData / EvalResult), the recipe, the data hashes and the reviews."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..runs import folder as runfolder
from ..runs.lineage import read_lineage


def _results(log: dict, model_name: str) -> list:
    from huggingface_hub import EvalResult

    out = []
    m = log.get("mmlu")
    if m:
        local = not str(m["path"]).count("/") == 1 or Path(m["path"]).exists()
        ds = Path(m["path"]).name if local else m["path"]
        out.append(EvalResult(task_type="multiple-choice", task_name="MMLU", dataset_type=ds, dataset_name=ds,
                              dataset_split="test", metric_type="accuracy", metric_name="accuracy (tuned)",
                              metric_value=round(m["tuned"]["acc"], 6),
                              dataset_args={"num_fewshot": m["num_fewshot"], "limit": m["limit"]}))
        out.append(EvalResult(task_type="multiple-choice", task_name="MMLU", dataset_type=ds, dataset_name=ds,
                              dataset_split="test", metric_type="mmlu_delta_points",
                              metric_name="MMLU delta vs base (points)", metric_value=round(m["delta_points"], 4)))
    for stage, h in (log.get("heldout") or {}).items():
        for key, mtype in (("reward_accuracy", "accuracy"), ("win_rate_vs_base", "win_rate"),
                           ("perplexity", "perplexity"), ("exact_match_tuned", "exact_match")):
            if isinstance(h.get(key), (int, float)):
                out.append(EvalResult(task_type="text-generation", task_name=f"held-out {stage}",
                                      dataset_type=f"{stage}-heldout", dataset_name=f"{stage} held-out rows",
                                      dataset_split="eval", metric_type=mtype, metric_name=key,
                                      metric_value=round(float(h[key]), 6)))
    return out


def _stage_view(log: dict, stage: str) -> dict:
    """The eval log as it concerns an earlier stage's adapter: only the figures the evaluation measured on that
    adapter (after: every_stage); the gates, the verdict and the reviews judged the final adapter, not this one."""
    own = (log.get("per_stage") or {}).get(stage) or {}
    return {**log, "mmlu": own.get("mmlu"), "heldout": {stage: own["heldout"]} if own.get("heldout") else {},
            "gates": [], "passed": None, "reviews": [], "datasets": []}


def _card_log(run_dir: Path, out_dir: Path, stage: str | None) -> tuple[dict, bool]:
    """(the eval log as the card shows it, whether `stage` is an earlier stage than the run's last). For a stage
    asked by name, an evaluation of another adapter than the one merged is left out."""
    log = runfolder.read_eval_log(run_dir) or {}
    if stage is None:
        return log, False
    names = [s["name"] for s in (runfolder.read_manifest(run_dir) or {}).get("stages", [])]
    if names and stage != names[-1]:
        return _stage_view(log, stage), True
    if log and log.get("adapter_hash") != (read_lineage(out_dir) or {}).get("adapter_hash"):
        return {}, False
    return log, False


def _stages_in(cfg: dict, stage: str | None, earlier: bool) -> list[dict]:
    """The recipe's stages that are in the merged model: up to `stage` for an earlier stage's merge."""
    stages = cfg.get("stages") or []
    names = [s.get("name") for s in stages]
    return stages[: names.index(stage) + 1] if earlier and stage in names else stages


def _intro(log: dict, stage: str | None, earlier: bool) -> str:
    if earlier:
        return (f"Stage `{stage}` of this run, merged by prefopt: a roll-back to that stage's adapter (the stages "
                "after it are not in this model). The run's gates judged its final adapter, not this one"
                + (": the figures below are this stage's own." if log.get("heldout") or log.get("mmlu") else "."))
    where = f" (stage `{stage}`, the last)" if stage else ""
    if "passed" not in log:
        return f"Trained and merged by prefopt{where}. Not evaluated (no evaluation of this adapter)."
    return f"Trained and merged by prefopt{where}. " + (
        "All gates passed." if log.get("passed") else "**A gate failed; merged with --ignore-gates.**")


def _lineage_lines(out_dir: Path) -> list[str]:
    """The chain beside the weights (lineage.json): data -> adapter -> ... -> merged model."""
    record = read_lineage(out_dir)
    if not record:
        return []
    lines = ["", "## Lineage", "", "| stage | data (sha256) | adapter hash |", "| --- | --- | --- |"]
    for st in record.get("stages", []):
        data = "; ".join(f"`{Path(d['path']).name}` `{str(d.get('sha256'))[:16]}`" for d in st.get("data", []))
        lines.append(f"| {st.get('stage')} | {data} | `{st.get('adapter_hash')}` |")
    return lines + ["", f"Merged model: `{record.get('merged_hash')}` (lineage.json)"]


def write_model_card(out_dir: Path, run_dir: Path, stage: str | None = None) -> Path:
    """out_dir/README.md for a run's merged model; `stage`: the stage whose adapter it merged, when asked for one
    (an earlier stage's card keeps to that stage's own figures)."""
    from huggingface_hub import ModelCard, ModelCardData

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    log, earlier = _card_log(run_dir, out_dir, stage)
    recipe = (run_dir / runfolder.RECIPE).read_text() if (run_dir / runfolder.RECIPE).is_file() else ""
    cfg = log.get("config") or yaml.safe_load(recipe or "{}") or {}
    name = cfg.get("name") or run_dir.name
    base = (cfg.get("model") or {}).get("name_or_path")
    data = ModelCardData(model_name=name, base_model=base if base and not Path(base).exists() else None,
                         library_name="transformers",
                         tags=["prefopt", "dora"] + [s["type"] for s in _stages_in(cfg, stage, earlier)],
                         eval_results=_results(log, name) or None)
    m = log.get("mmlu")
    lines = [f"# {name}" + (f" (stage {stage})" if earlier else ""), "", _intro(log, stage, earlier), ""]
    if base:
        lines += [f"Base model: `{base}`", ""]
    if m:
        lines += ["## MMLU", "", f"{m['path']} ({m['num_fewshot']}-shot, n = {m['tuned']['n']}): base "
                  f"{m['base']['acc']:.4f}, tuned {m['tuned']['acc']:.4f}, delta {m['delta_points']:+.2f} points "
                  f"(paired standard error {m['paired_stderr']:.2f})", ""]
    if earlier and not log.get("heldout"):
        lines += ["## Held-out metrics", "", "- not measured on this stage's adapter (the evaluation measures each "
                  "stage's with eval.after: every_stage)", "", "## Gates", ""]
    else:
        lines += ["## Held-out metrics", "", "```json", json.dumps(log.get("heldout"), indent=1), "```", "",
                  "## Gates", ""]
    lines += [f"- {g['name']}: {g['what']} = {g['value']}, {runfolder.gate_limit(g)}: **{g['verdict']}**"
              for g in log.get("gates", [])] or ["- not judged (they judged the final stage)" if earlier else
                                                 "- none set"]
    if log.get("datasets"):
        lines += ["", "## Data", "", "| role | path | sha256 |", "| --- | --- | --- |"]
        lines += [f"| {d['role']} | `{Path(d['path']).name}` | `{d['sha256']}` |" for d in log["datasets"]]
    lines += _lineage_lines(out_dir)
    lines += ["", "## Reviews", ""]
    lines += [f"- {r['at']}: {r['reviewer']}: **{r['verdict']}**" + (f" ({r['note']})" if r.get("note") else "")
              + (" -- *stale: this review read an earlier model*" if r.get("stale") else "")
              for r in log.get("reviews", [])] \
        or ["- the run's reviews read its final adapter" if earlier else
            "- none yet (`prefopt review RUN_DIR --reviewer NAME --verdict approve`)"]
    lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = out_dir / "README.md"
    runfolder.write_if_changed(path, str(card))
    return path
