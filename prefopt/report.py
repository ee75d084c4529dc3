"""runs/<name>/report.html from the run folder alone (rebuild it any time: `prefopt report RUN_DIR`).

One self-contained file: plots are PNGs (matplotlib, Agg) embedded as data: URIs; no script, no external link.
Sections: stages, training loss per stage, reward accuracy and margins over steps, held-out metrics, MMLU base vs
tuned per subject, completions side by side, each stage's data report (when the data step wrote one), gates and
merge verdict, reviews.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .runs import folder as runfolder


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 3.2))


def _series(history: list[dict], key: str) -> tuple[list, list]:
    pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and "step" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _table(rows: list[list], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _fmt(c)}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _plots(run_dir: Path, stages: list[dict]) -> list[str]:
    histories = {s["name"]: _read_json(run_dir / s["adapter"].rsplit("/", 1)[0] / "log_history.json") or []
                 for s in stages if s.get("adapter")}
    out = []
    fig, ax = _figure()
    drew = False
    for name, hist in histories.items():
        x, y = _series(hist, "loss")
        if x:
            ax.plot(x, y, marker=".", label=name)
            drew = True
    if drew:
        ax.set(title="Training loss per stage", xlabel="step", ylabel="loss")
        ax.legend()
        out.append("<h3>Training loss</h3>" + _png(fig))
    else:
        import matplotlib.pyplot as plt

        plt.close(fig)
    for name, hist in histories.items():
        x, acc = _series(hist, "rewards/accuracies")
        if not x:
            continue
        fig, ax = _figure()
        ax.plot(x, acc, marker=".", label="reward accuracy")
        for key in ("rewards/margins", "rewards/chosen", "rewards/rejected"):
            xs, ys = _series(hist, key)
            if xs:
                ax.plot(xs, ys, marker=".", label=key.split("/")[1])
        ax.set(title=f"{name}: reward accuracy and margins over steps", xlabel="step")
        ax.legend()
        out.append(f"<h3>{_e(name)}: rewards</h3>" + _png(fig))
    return out


def _mmlu_plot(m: dict) -> str:
    subjects = sorted(m.get("per_subject") or {})
    if not subjects:
        return ""
    fig, ax = _figure()
    xs = range(len(subjects))
    ax.bar([x - 0.2 for x in xs], [m["per_subject"][s]["base"] for s in subjects], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [m["per_subject"][s]["tuned"] for s in subjects], width=0.4, label="tuned")
    many = len(subjects) > 4
    ax.set_xticks(list(xs), subjects, rotation=45 if many else 0, ha="right" if many else "center",
                  fontsize=7 if len(subjects) > 12 else 9)
    ax.set(title="MMLU accuracy per subject", ylabel="accuracy", ylim=(0, 1))
    ax.legend()
    return _png(fig)


def build_report(run_dir: str | Path) -> Path:
    """runs/<name>/report.html from the run folder alone (run.json, stage reports, eval log, merge report)."""
    run_dir = Path(run_dir)
    manifest = runfolder.read_manifest(run_dir) or {}
    log = runfolder.read_eval_log(run_dir) or {}
    stages = manifest.get("stages", [])
    title = f"prefopt run report: {manifest.get('recipe_name', run_dir.name)}"
    body = [f"<h1>{_e(title)}</h1>",
            f"<p>run id {_e(manifest.get('run_id'))}, recipe hash {_e(manifest.get('recipe_hash'))}, prefopt "
            f"{_e(manifest.get('prefopt_version'))}</p>"]
    body += _stages_section(run_dir, stages)
    body += _data_section(run_dir, stages)
    if log:
        body += _eval_section(run_dir, log)
    body += _merge_section(run_dir, manifest, log)
    body += _reviews_section(log)
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;font-size:90%}"
             "pre{white-space:pre-wrap;margin:0}.fail{color:#b00}.pass{color:#070}")
    doc = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
           f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = run_dir / runfolder.REPORT
    runfolder.write_atomic(path, doc)
    return path


def _stages_section(run_dir: Path, stages: list[dict]) -> list[str]:
    body = ["<h2>Stages</h2>"]
    rows = []
    for s in stages:
        ev, tr = (s.get("metrics") or {}).get("eval") or {}, (s.get("metrics") or {}).get("train") or {}
        rows.append([s["name"], s["type"], s.get("status"), s.get("data", {}).get("train_rows"),
                     s.get("data", {}).get("eval_rows"), tr.get("train_loss"), ev.get("eval_loss"),
                     ev.get("eval_rewards/accuracies")])
    body.append(_table(rows, ["stage", "type", "status", "train rows", "eval rows", "train loss", "eval loss",
                              "reward accuracy"]))
    return body + _plots(run_dir, stages)


def _data_section(run_dir: Path, stages: list[dict]) -> list[str]:
    reports = [(s["name"], _read_json(run_dir / "stages" / f"{i:02d}-{s['name']}" / "data_report.json"))
               for i, s in enumerate(stages)]
    reports = [(n, r) for n, r in reports if isinstance(r, dict)]
    if not reports:
        return []
    body = ["<h2>Data reports</h2>"]
    for name, r in reports:
        dropped = r.get("dropped") or {}
        body.append(f"<h3>{_e(name)}</h3>" + _table(
            [[k, v] for k, v in r.items() if k != "dropped" and not isinstance(v, (dict, list))]
            + [[f"dropped: {k}", v] for k, v in dropped.items()], ["", "value"]))
    return body


def _eval_section(run_dir: Path, log: dict) -> list[str]:
    body = ["<h2>Held-out metrics (final model)</h2>"]
    held = log.get("heldout") or {}
    keys = sorted({k for h in held.values() for k in h})
    body.append(_table([[k] + [h.get(k) for h in held.values()] for k in keys], ["metric", *held]))
    for name, entry in (log.get("per_stage") or {}).items():
        h = entry.get("heldout") or {}
        body.append(f"<p>after stage {_e(name)}: " + ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in h.items()) + "</p>")
    m = log.get("mmlu")
    if m:
        body.append("<h2>MMLU</h2>")
        body.append(f"<p>{_e(m['path'])}, {m['num_fewshot']}-shot, n = {m['tuned']['n']}: base "
                    f"{m['base']['acc']:.4f}, tuned {m['tuned']['acc']:.4f}, delta <b>{m['delta_points']:+.2f}</b> "
                    f"points (paired standard error {m['paired_stderr']:.2f})</p>")
        body.append(_mmlu_plot(m))
    comps = []
    cpath = run_dir / runfolder.EVAL / "completions.jsonl"
    if cpath.is_file():
        comps = [json.loads(x) for x in cpath.read_text().splitlines() if x.strip()]
    if comps:
        body.append(f"<h2>Completions ({len(comps)}, greedy)</h2>")
        body.append(_table([[c["index"] + 1, _Raw(f"<pre>{_e(c['prompt'])}</pre>"),
                             _Raw(f"<pre>{_e(c['base'])}</pre>"), _Raw(f"<pre>{_e(c['tuned'])}</pre>")]
                            for c in comps], ["#", "prompt", "base", "tuned"]))
    body.append("<h2>Gates</h2>")
    body.append(_table([[g["name"], g["what"], runfolder.gate_limit(g), g["value"], _Raw(
        f"<b class='{_e(g['verdict'])}'>{_e(g['verdict'])}</b>")] for g in log.get("gates", [])],
        ["gate", "figure", "limit", "value", "verdict"]))
    body.append(f"<p>Evaluation verdict: <b>{'passed' if log.get('passed') else 'FAILED'}</b></p>")
    body.append("<h2>Datasets</h2>")
    body.append(_table([[d["role"], d["path"], d.get("sha256"), d.get("rows", d.get("train_rows"))]
                        for d in log.get("datasets", [])], ["role", "path", "sha256", "rows"]))
    return body


def _merge_section(run_dir: Path, manifest: dict, log: dict) -> list[str]:
    merge = manifest.get("merge")
    report = _read_json(run_dir / runfolder.MERGED / runfolder.MERGE_REPORT)
    if report and (report.get("verification") or {}).get("passed") is not None:
        v = report["verification"]
        said = (f"<p>merged/ ({_e(report.get('base_mode'))}): verification "
                f"<b>{'PASSED' if v.get('passed') else 'FAILED'}</b></p>")
    elif merge:
        said = f"<p>merge status: {_e(merge.get('status'))}</p>"
    elif log and not log.get("passed"):
        said = "<p>not merged: a gate failed</p>"
    else:
        said = "<p>not merged</p>"
    return ["<h2>Merge</h2>", said]


def _reviews_section(log: dict) -> list[str]:
    reviews = log.get("reviews") or []
    return ["<h2>Reviews</h2>",
            _table([[r["at"], r["reviewer"], r["verdict"], r.get("note") or "",
                     "stale: read an earlier model" if r.get("stale") else "current"] for r in reviews],
                   ["when", "reviewer", "verdict", "note", "model"]) if reviews else "<p>no review yet</p>"]


def write_report(run_dir: Path, echo) -> None:
    """Build the run's report.html and say where it is."""
    echo(f"prefopt: report: {build_report(run_dir)}")
