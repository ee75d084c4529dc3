"""merged/README.md: the model card of a merged run, with the eval results as model-index metadata
(huggingface_hub's ModelCardData / EvalResult), the recipe, the data hashes and the reviews."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs import folder as runfolder


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


def write_model_card(out_dir: Path, run_dir: Path) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    log = runfolder.read_eval_log(run_dir) or {}
    cfg = log.get("config") or {}
    name = cfg.get("name") or run_dir.name
    base = (cfg.get("model") or {}).get("name_or_path")
    data = ModelCardData(model_name=name, base_model=base if base and not Path(base).exists() else None,
                         library_name="transformers",
                         tags=["prefopt", "dora"] + [s["type"] for s in cfg.get("stages", [])],
                         eval_results=_results(log, name) or None)
    m = log.get("mmlu")
    lines = [f"# {name}", "", "Trained and merged by prefopt. "
             + ("All gates passed." if log.get("passed") else "**A gate failed; merged with --ignore-gates.**"), ""]
    if base:
        lines += [f"Base model: `{base}`", ""]
    if m:
        lines += ["## MMLU", "", f"{m['path']} ({m['num_fewshot']}-shot, n = {m['tuned']['n']}): base "
                  f"{m['base']['acc']:.4f}, tuned {m['tuned']['acc']:.4f}, delta {m['delta_points']:+.2f} points "
                  f"(paired standard error {m['paired_stderr']:.2f})", ""]
    lines += ["## Held-out metrics", "", "```json", json.dumps(log.get("heldout"), indent=1), "```", "",
              "## Gates", ""]
    lines += [f"- {g['name']}: {g['what']} = {g['value']}, {runfolder.gate_limit(g)}: **{g['verdict']}**"
              for g in log.get("gates", [])] or ["- none set"]
    lines += ["", "## Data", "", "| role | path | sha256 |", "| --- | --- | --- |"]
    lines += [f"| {d['role']} | `{Path(d['path']).name}` | `{d['sha256']}` |" for d in log.get("datasets", [])]
    lines += ["", "## Reviews", ""]
    lines += [f"- {r['at']}: {r['reviewer']}: **{r['verdict']}**" + (f" ({r['note']})" if r.get("note") else "")
              + (" -- *stale: this review read an earlier model*" if r.get("stale") else "")
              for r in log.get("reviews", [])] \
        or ["- none yet (`prefopt review RUN_DIR --reviewer NAME --verdict approve`)"]
    recipe = (run_dir / runfolder.RECIPE).read_text() if (run_dir / runfolder.RECIPE).is_file() else ""
    lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = out_dir / "README.md"
    runfolder.write_if_changed(path, str(card))
    return path
