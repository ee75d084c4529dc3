"""The sweep's comparison: one row per point, read from the point's run folder (run.json, eval/eval_log.json) and the
sweep's own record of it (sweep.json); the best point by the selected metric; the table as console text, CSV and
HTML. Reads files only: `prefopt sweep` writes the table again at the end of every attempt."""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from ..runs import folder as runfolder
from .spec import Selection

FIXED = ("point", "status", "time_s", "train_time_s", "trained", "reused", "mmlu_delta", "gates", "error")


def point_row(root: Path, record: dict) -> dict[str, Any]:
    """A point's row: its overrides, status, times, the stages it trained and reused, every stage's logged held-out
    and training figures (<stage>/eval/<m>, <stage>/train/loss), the evaluation's held-out figures
    (heldout/<stage>/<m>), MMLU delta and the gates' verdict."""
    row: dict[str, Any] = {"point": record["folder"], **record["overrides"], "status": record.get("status", "pending"),
                           "time_s": record.get("wall_s"), "error": record.get("error"),
                           "exit_code": record.get("exit_code")}
    how = record.get("stages") or {}
    row["trained"] = " ".join(n for n, h in how.items() if h in ("trained", "resumed"))
    row["reused"] = " ".join(n for n, h in how.items() if h == "reused")
    run_dir = root / record["folder"]
    manifest = runfolder.read_manifest(run_dir) or {}
    row["train_time_s"] = None
    order = []
    for st in manifest.get("stages", []):
        if st.get("status") != "done":
            continue
        order.append(st["name"])
        m = st.get("metrics") or {}
        for k, v in (m.get("eval") or {}).items():
            if k.startswith("eval_") and _number(v):
                row[f"{st['name']}/eval/{k[5:]}"] = v
        train = m.get("train") or {}
        if _number(train.get("train_loss")):
            row[f"{st['name']}/train/loss"] = train["train_loss"]
        if how.get(st["name"]) in ("trained", "resumed") and _number(train.get("train_runtime")):
            row["train_time_s"] = (row["train_time_s"] or 0.0) + train["train_runtime"]
    row["_stages"] = order
    log = runfolder.read_eval_log(run_dir) if manifest.get("eval") else None
    if log is not None and log.get("adapter_hash") and order:
        mmlu = log.get("mmlu") or {}
        row["mmlu_delta"] = mmlu.get("delta_points")
        failed = [g["name"] for g in log.get("gates", []) if g.get("verdict") == "fail"]
        row["gates"] = ("fail: " + ", ".join(failed)) if failed else ("pass" if log.get("gates") else None)
        for stage, values in (log.get("heldout") or {}).items():
            for k, v in (values or {}).items():
                if _number(v):
                    row[f"heldout/{stage}/{k}"] = v
    return row


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def selected_value(row: dict, sel: Selection) -> float | None:
    """The row's value of the selected metric: the stage's, or the last stage that logs it, or a run-wide one."""
    if sel.stage is not None:
        return row.get(f"{sel.stage}/{sel.metric}")
    if sel.metric in row and "/" not in sel.metric:
        return row.get(sel.metric)
    for stage in reversed(row.get("_stages", [])):
        if f"{stage}/{sel.metric}" in row:
            return row[f"{stage}/{sel.metric}"]
    return None


def mark_best(rows: list[dict], sel: Selection | None) -> dict | None:
    """The best finished point by the selection (a point whose gates failed, or that failed, is not a candidate);
    each row gets `selected` (its value) and `best` (True on one row)."""
    best = None
    for row in rows:
        # only a finished point has a value: a failed one's "last stage that logs it" would be an earlier stage
        row["selected"] = selected_value(row, sel) if sel and row["status"] in ("done", "gate failed") else None
        row["best"] = False
        v = row["selected"]
        if row["status"] != "done" or not _number(v):
            continue
        if best is None or (v < best["selected"] if sel.mode == "min" else v > best["selected"]):
            best = row
    if best is not None:
        best["best"] = True
    return best


def columns(rows: list[dict], grid_keys: list[str]) -> list[str]:
    """The CSV/HTML columns: the point, its grid values, status, selection, then every figure any row has."""
    figures = sorted({k for r in rows for k in r if "/" in k and k not in grid_keys})
    return ["point", *grid_keys, "status", "best", "selected", "time_s", "train_time_s", "trained", "reused",
            "mmlu_delta", "gates", *figures, "error"]


def to_csv(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else cell(r.get(c)) for c in cols])
    return buf.getvalue()


def cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def console_table(rows: list[dict], grid_keys: list[str], labels: list[str], sel: Selection | None) -> str:
    """A compact table: the grid values, status, the selected metric, MMLU delta and gates when evaluated, time,
    stages trained and reused; the best point marked with *."""
    show_mmlu = any(r.get("mmlu_delta") is not None for r in rows)
    show_gates = any(r.get("gates") for r in rows)
    head = ["", "point", *labels, "status", sel.describe() if sel else "selected"]
    head += (["mmlu Δ"] if show_mmlu else []) + (["gates"] if show_gates else []) + ["time s", "trained", "reused"]
    body = []
    for r in rows:
        line = ["*" if r.get("best") else "", r["point"][:2], *[cell(r.get(k)) for k in grid_keys], r["status"],
                _fmt(r.get("selected"))]
        line += ([_fmt(r.get("mmlu_delta"), 1)] if show_mmlu else []) + ([r.get("gates") or "-"] if show_gates else [])
        line += [_fmt(r.get("time_s"), 1), r.get("trained") or "-", r.get("reused") or "-"]
        body.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])


def _fmt(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if _number(v) else "-"


_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
          "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:"
          "left}tr.best{background:#e6f4e6;font-weight:600}tr.bad{color:#a33}p.meta{color:#555}")


def to_html(rows: list[dict], cols: list[str], *, title: str, lines: list[str]) -> str:
    """sweep.html: what was swept, the table with the best point highlighted, and each point's report linked."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    out += [f"<p class='meta'>{html.escape(x)}</p>" for x in lines]
    out.append("<table><tr>" + "".join(f"<th class='{'l' if c in ('point', 'status') else ''}'>{html.escape(c)}</th>"
                                       for c in cols) + "</tr>")
    for r in rows:
        cls = "best" if r.get("best") else ("bad" if r["status"] not in ("done",) else "")
        cells = []
        for c in cols:
            v = r.get(c)
            text = html.escape("" if v is None else cell(v))
            if c == "point":
                text = f"<a href='{html.escape(r['point'])}/{runfolder.REPORT}'>{text}</a>"
            cells.append(f"<td class='{'l' if c in ('point', 'status', 'error', 'trained', 'reused') else ''}'>"
                         f"{text}</td>")
        out.append(f"<tr class='{cls}'>" + "".join(cells) + "</tr>")
    out.append("</table></body></html>\n")
    return "\n".join(out)
