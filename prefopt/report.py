"""runs/<name>/report.html from the run folder alone (rebuild it any time: `prefopt report RUN_DIR`).

One self-contained file: plots are PNGs (matplotlib, Agg) embedded as data: URIs; no script, no external link (the
completions' filter is CSS). It leads with the verdict card (gates with their figures, MMLU delta ± stderr, reward
accuracy, merge verified with its figures, diagnostics), then the stages table, the plots (each stage's loss on its
own axes, rewards, learning rate; a stage that logged once shows its numbers), the data reports as one table across
stages (only the drop reasons that dropped something), held-out metrics, MMLU per subject, completions side by side,
gates, merge, reviews.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .runs import folder as runfolder
from .runs.status import run_status


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _png(fig, alt: str = "plot") -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _figure(ncols: int = 1):
    """A figure about 1,150 px wide (the page's width), one panel per column."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(11.5, 3.6), squeeze=False)
    return fig, list(axes[0])


def _series(history: list[dict], key: str) -> tuple[list, list]:
    pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and "step" in h
           and "train_runtime" not in h]  # (the trainer's closing record averages the whole stage: not a step)
    return [p[0] for p in pts], [p[1] for p in pts]


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _cell(c) -> str:
    if isinstance(c, _Raw):
        return f"<td>{c}</td>"
    if isinstance(c, _Num):
        return f"<td class='num'>{_e(c)}</td>"
    return f"<td>{_fmt(c)}</td>"


def _table(rows: list[list], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


class _Num(str):
    """A right-aligned cell."""

    def __new__(cls, v):
        return super().__new__(cls, "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))


def _histories(run_dir: Path, stages: list[dict]) -> dict[str, list[dict]]:
    return {s["name"]: [h for h in _read_json(run_dir / s["adapter"].rsplit("/", 1)[0] / "log_history.json") or []
                        if isinstance(h, dict)] for s in stages if s.get("adapter")}


# (title, [(log key, label)], y-axis label, y limits): one figure each, one panel per stage that logged the keys
PLOTS = (
    ("Training loss", [("loss", "loss")], "loss", None),
    ("Reward accuracy (chance 0.5)", [("rewards/accuracies", "reward accuracy")], "accuracy", (0, 1.05)),
    ("Rewards", [("rewards/margins", "margin"), ("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")],
     "reward", None),
    ("KL estimate (KTO)", [("kl", "KL")], "KL", None),
    ("Learning rate", [("learning_rate", "learning rate")], "lr", None),
)


def _plots(run_dir: Path, stages: list[dict]) -> list[str]:
    """Each plot with one panel per stage (SFT's and DPO's losses differ by ten times: never one axis); a stage
    that logged a value once shows it as a number."""
    histories = _histories(run_dir, stages)
    out = []
    for title, keys, ylabel, ylim in PLOTS:
        panels, single = [], []
        for name, hist in histories.items():
            series = [(label, *_series(hist, key)) for key, label in keys]
            series = [t for t in series if t[1]]
            if any(len(xs) > 1 for _, xs, _ in series):
                panels.append((name, series))
            elif series:
                single.append(f"{_e(name)}: " + ", ".join(f"{_e(label)} {_fmt(ys[0])} (step {xs[0]})"
                                                         for label, xs, ys in series))
        if not panels and not single:
            continue
        out.append(f"<h3>{_e(title)}</h3>")
        if panels:
            fig, axes = _figure(len(panels))
            for ax, (name, series) in zip(axes, panels):
                for label, xs, ys in series:
                    ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label)
                ax.set(title=name, xlabel="step", ylabel=ylabel)
                if ylim:
                    ax.set_ylim(*ylim)
                if len(series) > 1:
                    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(series), frameon=False)
                ax.grid(alpha=0.3)
            fig.tight_layout()
            out.append(_png(fig, title))
        out += [f"<p>{line} (logged once)</p>" for line in single]
    return out


def _mmlu_plot(m: dict) -> str:
    subjects = sorted(m.get("per_subject") or {})
    if not subjects:
        return ""
    fig, (ax,) = _figure()
    xs = range(len(subjects))
    ax.bar([x - 0.2 for x in xs], [m["per_subject"][s]["base"] for s in subjects], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [m["per_subject"][s]["tuned"] for s in subjects], width=0.4, label="tuned")
    many = len(subjects) > 4
    ax.set_xticks(list(xs), subjects, rotation=45 if many else 0, ha="right" if many else "center",
                  fontsize=7 if len(subjects) > 12 else 9)
    ax.set(title="MMLU accuracy per subject", ylabel="accuracy", ylim=(0, 1))
    ax.legend(loc="upper right")
    return _png(fig, "MMLU accuracy per subject")


def build_report(run_dir: str | Path) -> Path:
    """runs/<name>/report.html from the run folder alone (run.json, stage reports, eval log, merge report)."""
    run_dir = Path(run_dir)
    manifest = runfolder.read_manifest(run_dir) or {}
    log = runfolder.read_eval_log(run_dir) or {}
    stages = manifest.get("stages", [])
    title = f"prefopt run report: {manifest.get('recipe_name', run_dir.name)}"
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class='meta'>run id {_e(manifest.get('run_id'))}, recipe hash {_e(manifest.get('recipe_hash'))}, "
            f"prefopt {_e(manifest.get('prefopt_version'))}</p>"]
    body += _verdict_card(run_dir, manifest, log)
    body += _diagnostics_section(stages)
    body += _stages_section(run_dir, stages)
    body += _data_section(run_dir, stages)
    if log:
        body += _eval_section(run_dir, log)
    body += _merge_section(run_dir, manifest, log)
    body += _reviews_section(log)
    doc = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
           f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = run_dir / runfolder.REPORT
    runfolder.write_atomic(path, doc)
    return path


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.5em;margin-bottom:.2em}.meta{color:#666;margin-top:0}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;"
    "vertical-align:top;font-size:90%}th{background:#f4f4f4}td.num{text-align:right}"
    "pre{white-space:pre-wrap;margin:0}.fail{color:#b00}.pass{color:#070}img.plot{width:100%;height:auto}"
    ".card{border:2px solid #070;border-radius:8px;padding:.6em 1.2em;margin:1em 0;background:#f6fbf6}"
    ".card.bad{border-color:#b00;background:#fdf5f5}.card.open{border-color:#a80;background:#fdfbf3}"
    ".card h2{margin:.2em 0 .4em}.card ul{margin:.2em 0;padding-left:1.2em}.card li{margin:.15em 0}"
    "#c-changed:checked~table tr.same,#c-same:checked~table tr.changed{display:none}"
)


def _verdict_card(run_dir: Path, manifest: dict, log: dict) -> list[str]:
    """The first thing on the page: did the run pass, by how much, and is the merged model verified."""
    try:
        st = run_status(run_dir)
    except Exception:  # a folder too broken for a status: the sections below still show what there is
        return []
    items = []
    done = sum(s.state in ("done", "reused") for s in st.stages)
    items.append(f"stages: {done} of {len(st.stages)} done" + "".join(
        f"; {_e(s.name)} {_e(s.state)}" + (f" ({_e(s.detail)})" if s.detail else "")
        for s in st.stages if s.state not in ("done", "reused")))
    if st.eval.state == "not run":
        items.append("evaluation: not run")
    else:
        cls = "pass" if st.eval.state == "passed" else "fail"
        items.append(f"evaluation gates: <b class='{cls}'>{st.eval.state.upper()}</b>"
                     + "".join(f"<br>&nbsp;&nbsp;{_e(g)}" for g in st.eval.gates))
        if st.eval.mmlu:
            items.append(f"MMLU base -&gt; tuned: <b>{_e(st.eval.mmlu)}</b>")
        if st.eval.reward_accuracy is not None:
            items.append(f"held-out reward accuracy: <b>{st.eval.reward_accuracy:.2f}</b> (chance 0.50)")
    mg = st.merge
    cls = "pass" if mg.state == "verified" else "fail" if mg.state.startswith("failed") else ""
    items.append(f"merge: <b class='{cls}'>{_e(mg.state)}</b>" + (f": {_e(mg.figures)}" if mg.figures else ""))
    diags = [(s.get("name"), d) for s in manifest.get("stages", []) for d in s.get("diagnostics", []) or []]
    items.append("diagnostics: " + ("; ".join(f"{_e(name)}: {_e(d.get('what', d.get('name')))}"
                                              if isinstance(d, dict) else _e(d) for name, d in diags)
                                    if diags else "none"))
    bad = st.eval.state == "failed" or mg.state == "failed" or any(s.state == "failed" for s in st.stages)
    whole = "bad" if bad else "" if (st.done and st.eval.state != "failed") else "open"
    verdict = "FAILED" if bad else "PASSED" if st.done and st.eval.state == "passed" else \
        "done" if st.done else "not finished"
    return [f"<div class='card {whole}' id='verdict'><h2>Verdict: {verdict}</h2><ul>"
            + "".join(f"<li>{i}</li>" for i in items) + "</ul></div>"]


def _stages_section(run_dir: Path, stages: list[dict]) -> list[str]:
    body = ["<h2>Stages</h2>"]
    try:
        st = run_status(run_dir)
        rows = [[f"{s.name} ({s.type})", s.state + (f" ({s.detail})" if s.detail else ""), _Num(s.rows),
                 _Num("" if s.steps is None else s.steps), _Num("" if s.seconds is None else f"{s.seconds:.1f} s"),
                 s.key_metric] for s in st.stages]
    except Exception:
        rows = [[s["name"], s.get("status"), "", "", "", ""] for s in stages]
    body.append(_table(rows, ["stage", "state", "rows (train + eval of read)", "steps", "time", "key metric"]))
    return body + _plots(run_dir, stages)


def _diagnostics_section(stages: list[dict]) -> list[str]:
    """What each stage's log showed (prefopt.advice.diagnose), with the suggestion; nothing when all is quiet."""
    found = [(s["name"], d) for s in stages for d in s.get("diagnostics") or []]
    if not found:
        return []
    items = "".join(f"<li><b>{_e(name)}</b>: {_e(d['what'])}. <i>{_e(d['suggestion'])}</i></li>" for name, d in found)
    return ["<h2>Diagnostics</h2>", f"<ul>{items}</ul>"]


def _data_section(run_dir: Path, stages: list[dict]) -> list[str]:
    """One table across stages: rows read, kept for training and held out, then each drop reason that dropped a row
    in some stage."""
    reports = [(s["name"], _read_json(run_dir / "stages" / f"{i:02d}-{s['name']}" / "data_report.json"))
               for i, s in enumerate(stages)]
    reports = [(n, r) for n, r in reports if isinstance(r, dict)]
    if not reports:
        return []
    reasons = sorted({k for _, r in reports for k, v in (r.get("dropped") or {}).items() if v})
    rows = [[label] + [_Num(r.get(key, "")) for _, r in reports]
            for label, key in (("rows read", "input_rows"), ("train rows", "train_rows"),
                               ("eval rows", "eval_rows"))]
    if any(r.get("labels") for _, r in reports):  # KTO stages: the label balance, and the pairs split
        rows += [[f"train {what}"] + [_Num(((r.get("labels") or {}).get("train") or {}).get(key, ""))
                                      for _, r in reports]
                 for what, key in (("desirable", "desirable"), ("undesirable", "undesirable"),
                                   ("pairs split", "pairs_split"))]
    rows += [[f"dropped: {k}"] + [_Num((r.get("dropped") or {}).get(k) or "") for _, r in reports] for k in reasons]
    note = "" if reasons else "<p>nothing dropped by the data step's filters</p>"
    return ["<h2>Data</h2>", _table(rows, ["", *[n for n, _ in reports]]), note]


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
        body += _completions(comps)
    body.append("<h2>Gates</h2>")
    body.append(_table([[g["name"], g["what"], runfolder.gate_limit(g), g["value"], _Raw(
        f"<b class='{_e(g['verdict'])}'>{_e(g['verdict'])}</b>")] for g in log.get("gates", [])],
        ["gate", "figure", "limit", "value", "verdict"]))
    body.append(f"<p>Evaluation verdict: <b>{'passed' if log.get('passed') else 'FAILED'}</b></p>")
    body.append("<h2>Datasets</h2>")
    body.append(_table([[d["role"], d["path"], d.get("sha256"), d.get("rows", d.get("train_rows"))]
                        for d in log.get("datasets", [])], ["role", "path", "sha256", "rows"]))
    return body


def _completions(comps: list[dict]) -> list[str]:
    """Prompt, base and tuned side by side; a CSS-only filter shows all, only those the tuning changed, or the rest."""
    changed = sum(c["base"].strip() != c["tuned"].strip() for c in comps)
    rows = ["<table><tr><th>#</th><th>prompt</th><th>base</th><th>tuned</th></tr>"]
    for c in comps:
        cls = "changed" if c["base"].strip() != c["tuned"].strip() else "same"
        rows.append(f"<tr class='{cls}'><td class='num'>{c['index'] + 1}</td><td><pre>{_e(c['prompt'])}</pre></td>"
                    f"<td><pre>{_e(c['base'])}</pre></td><td><pre>{_e(c['tuned'])}</pre></td></tr>")
    filt = ("<input type='radio' name='cf' id='c-all' checked><label for='c-all'> all </label>"
            f"<input type='radio' name='cf' id='c-changed'><label for='c-changed'> changed by tuning ({changed}) "
            f"</label><input type='radio' name='cf' id='c-same'><label for='c-same'> unchanged "
            f"({len(comps) - changed}) </label>")
    return [f"<h2>Completions ({len(comps)}, greedy)</h2>", f"<div class='comps'>{filt}" + "\n".join(rows)
            + "</table></div>"]


def _merge_section(run_dir: Path, manifest: dict, log: dict) -> list[str]:
    merge = manifest.get("merge")
    report = _read_json(run_dir / runfolder.MERGED / runfolder.MERGE_REPORT)
    if report and (report.get("verification") or {}).get("passed") is not None:
        v = report["verification"]
        th = v.get("thresholds") or {}
        said = (f"<p>merged/ ({_e(report.get('base_mode'))}): verification "
                f"<b>{'PASSED' if v.get('passed') else 'FAILED'}</b> over {_e(v.get('tokens'))} tokens of "
                f"{_e(v.get('probes'))} {_e(v.get('probe_source', 'probe rows'))}</p>" + _table(
                    [["max relative logit difference", _Num(v.get("max_rel_logit_diff")),
                      _Num(f"<= {th.get('max_rel_logit_diff', '')}")],
                     ["mean KL", _Num(v.get("mean_kl")), _Num(f"<= {th.get('mean_kl', '')}")],
                     ["top-1 agreement", _Num(v.get("top1_agreement")),
                      _Num(f">= {th.get('min_top1_agreement', '')}")]],
                    ["figure", "merged vs adapter model", "limit"]))
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
