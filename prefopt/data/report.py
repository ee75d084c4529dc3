"""The data step's outputs: data_report.json, the review sample (JSONL and Markdown), the console table."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs.folder import write_atomic

REPORT = "data_report.json"
REVIEW_JSONL = "review_sample.jsonl"
REVIEW_MD = "review_sample.md"
DROPPED = "data_dropped.jsonl"


def write_reports(folder: Path, data) -> None:
    """data_report.json and the review sample of one stage, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / REPORT, json.dumps(data.report, indent=2, ensure_ascii=False))
    write_atomic(folder / REVIEW_JSONL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data.review))
    write_atomic(folder / REVIEW_MD, review_markdown(data.report, data.review))
    write_atomic(folder / DROPPED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data.dropped))


def _md_text(v) -> str:
    if isinstance(v, str):
        return v
    return "\n\n".join(f"**{m['role']}**: {m['content']}" for m in v)


def review_markdown(report: dict, review: list[dict]) -> str:
    what = ("an answer labelled desirable that is not (or the reverse)" if report.get("labels") else
            "a chosen answer worse than its rejected one")
    out = [f"# Review sample: stage {report['stage']} ({report['type']})", "",
           f"{len(review)} of the {report['train_rows']} training rows, drawn with the recipe's seed. Read them before "
           f"training: wrong answers, {what}, formatting debris and leaked evaluation items show here first.", ""]
    for k, r in enumerate(review, 1):
        out.append(f"## {k}. {r['source']} row {r['row']}")
        for key in ("prompt", "chosen", "rejected", "completion", "messages", "text"):
            if key in r:
                out += [f"### {key}" + (f" ({'desirable' if r['label'] else 'undesirable'})" if key == "completion"
                                        and "label" in r else ""), "", _md_text(r[key]), ""]
    return "\n".join(out) + "\n"


def summary_lines(report: dict) -> list[str]:
    """A short table for the console."""
    dropped = {k: v for k, v in report["dropped"].items() if v}
    lines = [f"data {report['stage']}: {report['input_rows']} rows read -> {report['train_rows']} train, "
             f"{report['eval_rows']} eval" + ("" if dropped else "; nothing dropped")]
    labels = report.get("labels")
    if labels:
        tr, ev = labels["train"], labels["eval"]
        split = tr["pairs_split"] + ev["pairs_split"]
        lines.append(f"  labels: train {tr['desirable']} desirable / {tr['undesirable']} undesirable"
                     + (f", eval {ev['desirable']} / {ev['undesirable']}" if ev["desirable"] + ev["undesirable"]
                        else "")
                     + (f"; {split} preference pairs split into a desirable and an undesirable row each" if split
                        else ""))
    for key, what in (("not_sampled", "not sampled by the mixture"), ("over_max_samples", "past max_samples")):
        if report.get(key):
            lines.append(f"  left out {report[key]:>5} {what}")
    for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]):
        ex = (report["examples"].get(reason) or [{}])[0]
        where = f" (e.g. {ex['source']} row {ex['row']}: {ex['why']})" if ex else ""
        lines.append(f"  dropped {n:>6} {reason}{where}")
    tok = report.get("tokens") or {}
    if tok.get("truncated_rows"):
        n = tok["truncated_rows"]
        lines.append(f"  warning: {n} kept row{'s are' if n != 1 else ' is'} longer than max_length "
                     f"{tok['max_length']} and will be cut to it")
    if not report.get("token_checks"):
        lines.append("  (token checks not run: the tokenizer could not be loaded)")
    return lines
