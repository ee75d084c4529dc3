"""What a run folder says about itself: each stage done / running / interrupted (resumable from step N) / failed /
reused / not started, the evaluation's verdict, the merge's state, and where the outputs are. Read by
`prefopt status`, the closing summary of `prefopt run` and `prefopt.status()`; it writes nothing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..errors import PrefoptError
from . import folder as runfolder


@dataclass
class StageStatus:
    name: str
    type: str
    state: str  # done | reused | running | interrupted | failed | not started
    detail: str = ""  # "resumable from step 40", the error's first line, "reused from <store>"
    rows: str = ""  # "288 of 320" (train rows kept of the rows read)
    steps: int | None = None
    seconds: float | None = None
    key_metric: str = ""  # "eval loss 5.639" / "held-out acc 1.00, margin +0.556"
    adapter: Path | None = None


@dataclass
class EvalStatus:
    state: str  # passed | failed | not run
    mmlu: str = ""  # "0.250 -> 0.333 (+8.33 ± 15.83 points)"
    reward_accuracy: float | None = None
    gates: list[str] = field(default_factory=list)  # "min_reward_accuracy 1.00 (>= 0.75) pass"
    log: Path | None = None


@dataclass
class MergeStatus:
    state: str  # verified | merged (not verified) | failed | not run
    figures: str = ""  # "max |Δlogit| 0.81% of max, KL 5.1e-08, top-1 1.000"
    path: Path | None = None


@dataclass
class RunStatus:
    run_dir: Path
    name: str
    stages: list[StageStatus]
    eval: EvalStatus
    merge: MergeStatus
    last_attempt: str | None = None  # ISO time the run folder last changed
    report: Path | None = None

    @property
    def done(self) -> bool:
        return bool(self.stages) and all(s.state in ("done", "reused") for s in self.stages)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def run_status(run_dir: str | Path) -> RunStatus:
    """The status of RUN_DIR; a PrefoptError (exit code 2) when it is not a prefopt run folder."""
    run_dir = Path(run_dir)
    manifest = runfolder.read_manifest(run_dir) if run_dir.is_dir() else None
    if manifest is None or "run_id" not in manifest:
        why = "does not exist" if not run_dir.exists() else "is not a prefopt run folder (no readable run.json)"
        raise PrefoptError(f"{run_dir} {why}; `prefopt status` with no argument lists the run folders under runs/")
    entries = {e["name"]: e for e in manifest.get("stages", [])}
    stages = [_stage(run_dir, i, name, entries.get(name), typ) for i, (name, typ) in enumerate(_recipe_stages(run_dir))]
    known = {s.name for s in stages}
    stages += [_stage(run_dir, None, e["name"], e, e.get("type", "?")) for e in manifest.get("stages", [])
               if e["name"] not in known]
    log = runfolder.read_eval_log(run_dir)
    report = run_dir / runfolder.REPORT
    ev, mg = _eval(run_dir, manifest.get("eval"), log), _merge(run_dir, manifest.get("merge"))
    if not all(s.state in ("done", "reused") for s in stages):  # they judged an earlier attempt's adapter
        ev.state = f"{ev.state}, stale (an earlier attempt's)" if ev.state != "not run" else ev.state
        mg.state = f"{mg.state}, stale (an earlier attempt's)" if mg.state != "not run" else mg.state
    return RunStatus(run_dir=run_dir, name=manifest.get("recipe_name", run_dir.name), stages=stages, eval=ev,
                     merge=mg, last_attempt=_last_change(run_dir), report=report if report.is_file() else None)


def list_runs(root: str | Path = "runs") -> list[RunStatus]:
    """Every run folder directly under ROOT (sweeps' points included one level down), newest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            for cand in [p, *sorted(p.iterdir())] if p.is_dir() else []:
                if cand.is_dir() and (cand / runfolder.MANIFEST).is_file():
                    try:
                        found.append(run_status(cand))
                    except PrefoptError:
                        continue
    return sorted(found, key=lambda s: s.last_attempt or "", reverse=True)


def _recipe_stages(run_dir: Path) -> list[tuple[str, str]]:
    try:
        rec = yaml.safe_load((run_dir / runfolder.RECIPE).read_text())
        return [(s["name"], s["type"]) for s in rec.get("stages", [])]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return []


def _alive(entry: dict) -> bool:
    """A 'running' record whose process is still there (on this machine; another machine's cannot be checked)."""
    pid, host = entry.get("pid"), entry.get("host")
    if not isinstance(pid, int) or host not in (None, socket.gethostname()):
        return host is not None  # another machine's run: believed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stage(run_dir: Path, i: int | None, name: str, e: dict | None, typ: str) -> StageStatus:
    if e is None or e.get("status") in (None, "pending"):
        return StageStatus(name, typ, "not started")
    stage_dir = run_dir / Path(e.get("adapter", f"stages/{name}/adapter")).parent
    status = e["status"]
    detail = ""
    if status == "running" and not _alive(e):
        status = "interrupted"
    if status == "interrupted" or (status == "failed" and "error" not in e):
        last = runfolder.last_checkpoint(runfolder.stage_tmp(stage_dir))
        step = last[1] if last else e.get("last_checkpoint_step")
        detail = f"resumable from step {step}" if step else "restarts from step 0 (no checkpoint yet)"
    if status == "failed" and e.get("error"):
        detail = e["error"]
    if status == "done" and e.get("reused_from"):
        status, detail = "reused", f"from {e['reused_from']}"
    d = e.get("data") or {}
    split = any((d.get("labels") or {}).get(k, {}).get("pairs_split") for k in ("train", "eval"))
    rows = (f"{d['train_rows']} + {d.get('eval_rows', 0)} of {d['input_rows']}" + (" pairs" if split else "")
            if "train_rows" in d and "input_rows" in d else "")
    train = (e.get("metrics") or {}).get("train") or {}
    done = status in ("done", "reused")  # (an unfinished attempt's folder still holds the previous attempt's log)
    return StageStatus(name, e.get("type", typ), status, detail, rows,
                       train.get("steps") or (_logged_steps(stage_dir) if done else None),
                       train.get("train_runtime") or _seconds(e), key_metric(e.get("type", typ), e.get("metrics")),
                       stage_dir / "adapter" if status in ("done", "reused") else None)


def _logged_steps(stage_dir: Path) -> int | None:
    try:
        hist = json.loads((stage_dir / "log_history.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    steps = [h.get("step") for h in hist if isinstance(h, dict) and isinstance(h.get("step"), int)]
    return max(steps) if steps else None


def _seconds(e: dict) -> float | None:
    try:
        a, b = _dt.datetime.fromisoformat(e["started_at"]), _dt.datetime.fromisoformat(e["ended_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return (b - a).total_seconds()


def key_metric(stage_type: str, metrics: dict | None) -> str:
    """The one figure a person reads for a stage: SFT's held-out (else training) loss; a preference stage's held-out
    reward accuracy and margin (else the training loss)."""
    metrics = metrics or {}
    ev, tr = metrics.get("eval") or {}, metrics.get("train") or {}
    acc, margin = ev.get("eval_rewards/accuracies"), ev.get("eval_rewards/margins")
    if stage_type != "sft" and isinstance(acc, (int, float)):
        return f"held-out acc {acc:.2f}" + (f", margin {margin:+.3f}" if isinstance(margin, (int, float)) else "")
    if stage_type != "sft" and isinstance(margin, (int, float)):  # KTO: no pairs, no accuracy
        return f"held-out margin {margin:+.3f}"
    if isinstance(ev.get("eval_loss"), (int, float)):
        return f"eval loss {ev['eval_loss']:.4f}"
    if isinstance(tr.get("train_loss"), (int, float)):
        return f"train loss {tr['train_loss']:.4f}"
    return ""


def _eval(run_dir: Path, entry: dict | None, log: dict | None) -> EvalStatus:
    if not entry or log is None:
        return EvalStatus("not run")
    st = EvalStatus("passed" if log.get("passed") else "failed", log=run_dir / runfolder.EVAL / runfolder.EVAL_LOG)
    m = log.get("mmlu")
    if m:
        st.mmlu = (f"{m['base']['acc']:.3f} -> {m['tuned']['acc']:.3f} ({m['delta_points']:+.2f} ± "
                   f"{m['paired_stderr']:.2f} points, n={m['tuned']['n']})")
    for h in (log.get("heldout") or {}).values():
        if isinstance(h.get("reward_accuracy"), (int, float)):
            st.reward_accuracy = h["reward_accuracy"]
    for g in log.get("gates", []):
        v = g.get("value")
        st.gates.append(f"{g['name']} {runfolder.fmt(v) if v is not None else 'not measured'} "
                        f"({runfolder.gate_limit(g)}) {g.get('verdict', '?')}")
    return st


def _merge(run_dir: Path, entry: dict | None) -> MergeStatus:
    if not entry:
        return MergeStatus("not run")
    path = run_dir / entry.get("path", runfolder.MERGED)
    if entry.get("status") != "done":
        return MergeStatus(entry.get("status", "failed"), entry.get("error", ""), None)
    v = entry.get("verification")
    if not v:
        return MergeStatus("merged (not verified)", "", path)
    figures = (f"max |Δlogit| {100 * v['max_rel_logit_diff']:.2f}% of max, mean KL {v['mean_kl']:.2g}, "
               f"top-1 {v['top1_agreement']:.3f} over {v.get('tokens', '?')} tokens")
    return MergeStatus("verified" if v.get("passed") else "failed", figures, path)


def _last_change(run_dir: Path) -> str | None:
    try:
        t = (run_dir / runfolder.MANIFEST).stat().st_mtime
    except OSError:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def render(st: RunStatus, *, width: int = 110, title: str | None = None, paths: bool = True) -> str:
    """The status as a person reads it: a table of stages, then the evaluation and merge lines, then the paths."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col, just in (("stage", "left"), ("state", "left"), ("rows", "right"), ("steps", "right"),
                      ("time", "right"), ("key metric", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for s in st.stages:
        state = s.state + (f" ({s.detail})" if s.detail else "")
        table.add_row(f"{s.name} ({s.type})", state, s.rows, "" if s.steps is None else str(s.steps),
                      "" if s.seconds is None else f"{s.seconds:.1f} s", s.key_metric)
    buf = io.StringIO()
    out = Console(file=buf, width=width, force_terminal=False, color_system=None, highlight=False)
    out.print(table)
    lines = [line.rstrip() for line in buf.getvalue().strip("\n").splitlines()]
    ev = st.eval
    if ev.state == "not run":
        lines.append("eval:   not run")
    else:
        head, _, rest = ev.state.partition(",")
        parts = [f"gates {head.upper()}" + (f" ({rest.strip()})" if rest else "")]
        if ev.mmlu:
            parts.append(f"MMLU {ev.mmlu}")
        if ev.reward_accuracy is not None:
            parts.append(f"held-out reward accuracy {ev.reward_accuracy:.2f}")
        lines.append("eval:   " + "; ".join(parts))
        lines += [f"        gate {g}" for g in ev.gates]
    mg = st.merge
    lines.append(f"merge:  {mg.state}" + (f": {mg.figures}" if mg.figures else ""))
    if paths:
        for label, p in (("report", st.report), ("merged", mg.path), ("eval log", ev.log)):
            if p is not None:
                lines.append(f"{label + ':':<10}{p}")
    if paths and st.last_attempt:
        lines.append(f"last change: {st.last_attempt}")
    return "\n".join(lines)


def render_list(runs: list[RunStatus]) -> str:
    """One line per run folder: where, stages done of all, eval and merge state, last change."""
    if not runs:
        return "no run folders found"
    rows = []
    for r in runs:
        done = sum(s.state in ("done", "reused") for s in r.stages)
        bad = [f"{s.name} {s.state}" for s in r.stages if s.state not in ("done", "reused", "not started")]
        rows.append((str(r.run_dir), f"{done}/{len(r.stages)} stages done" + (f" ({', '.join(bad)})" if bad else ""),
                     f"eval {r.eval.state}", f"merge {r.merge.state}", r.last_attempt or ""))
    w = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows)
