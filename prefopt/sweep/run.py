"""`prefopt sweep`: a grid of recipe values, each point an ordinary run folder under runs/<name>-sweep/<point>/, run
one after another through the same pipeline as `prefopt run`.

Stages whose inputs are the same across points train once: the later points reuse them through the shared store
(prefopt.runs.store), and their DPO reference log-probs through the reference cache. Every problem of every point is
reported before any point starts. A rerun skips the points that finished with the same recipe, resumes the one that
was interrupted (its finished stages kept, its stage from the last checkpoint); a failed point is recorded and the
others go on. The sweep's record is runs/<name>-sweep/sweep.json; its table sweep.csv and sweep.html.

A sweep never deletes a run folder, and never writes into one it did not create.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracking
from ..config import load_recipe
from ..errors import EXIT_BUG, EXIT_USER, GateFailed, PrefoptError, RecipeError, RunFolderError, SweepIncomplete
from ..pipeline import run as run_pipeline
from ..runs import folder as runfolder
from ..runs.folder import write_atomic
from ..runs.records import forget_committed, now
from . import table
from .spec import (
    Point,
    Selection,
    SweepSpec,
    check_points,
    grid_labels,
    grid_problems,
    merged_spec,
    parse_select,
    same_field_problems,
    shared_store,
)

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_HTML = "sweep.html"
FINISHED = ("done", "gate failed")  # a rerun skips these (when the point's recipe is unchanged)


@dataclass
class SweepResult:
    """What `prefopt.sweep` returns: the sweep folder, one row per point (overrides, status, figures, best), the
    selection, and the table's files."""

    root: Path
    rows: list[dict]
    selection: Selection | None
    grid_keys: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def best(self) -> dict | None:
        return next((r for r in self.rows if r.get("best")), None)

    @property
    def csv(self) -> Path:
        return self.root / SWEEP_CSV

    @property
    def html(self) -> Path:
        return self.root / SWEEP_HTML

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] not in FINISHED]

    def check(self) -> None:
        """Raise SweepIncomplete (exit 2, or 1 when a point failed on a bug) when a point failed."""
        failed = [r for r in self.rows if r["status"] == "failed"]
        if not failed:
            return
        code = EXIT_BUG if any(r.get("exit_code") == EXIT_BUG for r in failed) else EXIT_USER
        names = ", ".join(r["point"] for r in failed)
        raise SweepIncomplete(f"{len(failed)} of {len(self.rows)} points failed ({names}); the table has their "
                              "errors; rerun the same command to retry them (finished points are skipped)", code)

    def text(self) -> str:
        """The comparison table as the console shows it."""
        return table.console_table(self.rows, self.grid_keys, self.labels, self.selection)


@dataclass
class Prepared:
    """A sweep checked and ready: its folder, record, points (each with its recipe) and selection."""

    root: Path
    state: dict
    points: list[Point]
    selection: Selection | None
    notes: list[str]
    spec: SweepSpec


def sweep_dir_of(name: str, output_dir: str | Path | None) -> Path:
    return Path(output_dir) if output_dir else Path("runs") / f"{name}-sweep"


def prepare(spec: SweepSpec, *, grid: list[str] = (), select: str | None = None, max_points: int | None = None,
            output_dir: str | Path | None = None) -> Prepared:
    """Every check, before any point starts and before anything is written: the grid's keys and values, each
    point's whole recipe (as `prefopt run` checks it), the selection metric, and the folders (a sweep writes only
    into folders it made). Raises RecipeError / RunFolderError naming every problem."""
    base = load_recipe(spec.recipe, spec.sets)
    spec = merged_spec(spec, base.sweep, list(grid), select, max_points)
    problems = grid_problems(spec) + same_field_problems(spec)
    root = sweep_dir_of(base.name, output_dir)
    state = _read_state(root, base.name)
    group = base.tracking.wandb.group or state.get("group") or f"{base.name}-sweep-{uuid.uuid4().hex[:8]}"
    cache_dir, store_note = shared_store(base, root)
    fixed = {"sweep": None, "tracking.wandb.group": group, **({"cache_dir": cache_dir} if cache_dir else {})}
    points, more = check_points(spec, base.name, fixed) if not problems else ([], [])
    sel, bad_select = parse_select(spec.select, points)
    problems += more + bad_select + _foreign_folders(root, points, state) + _changed_finished(root, points, state)
    if problems:
        raise RecipeError(problems, str(spec.recipe), subject="the sweep")
    state.update(recipe_name=base.name, recipe=str(Path(spec.recipe).resolve()), group=group,
                 grid=[[k, v] for k, v in spec.grid], select=sel.describe() if sel else None)
    state.setdefault("created_at", now())
    state.setdefault("made", [])
    state.setdefault("points", {})
    notes = [store_note] if store_note else []
    earlier = [f for f in state["points"] if f not in {p.folder for p in points}]
    if earlier:
        n = len(earlier)
        notes.append(f"{n} point{'s' if n != 1 else ''} of an earlier grid ({', '.join(earlier)}) stay in their "
                     "folders, not in this table")
    return Prepared(root, state, points, sel, notes, spec)


def identity_of(p: Point) -> str:
    """What makes a point's run: its whole recipe, self-contained (a rerun skips a finished point only when equal)."""
    return p.recipe.section_hash(runfolder.self_contained(p.recipe).to_dict())


def _changed_finished(root: Path, points: list[Point], state: dict) -> list[str]:
    """Finished points whose recipe is no longer the same (another --set, an edited recipe or data): rerunning them
    in place would replace finished results, so the sweep refuses."""
    out = []
    for p in points:
        rec = state.get("points", {}).get(p.folder) or {}
        if p.recipe is None or rec.get("status") not in FINISHED or runfolder.read_manifest(root / p.folder) is None:
            continue
        if rec.get("identity") != identity_of(p):
            out.append(f"{root / p.folder}: finished earlier with another recipe (a --set value, the recipe or its "
                       "data changed since); a sweep does not replace a finished point: give the changed sweep "
                       "another --output-dir, or move that folder away to run the point again")
    return out


def _read_state(root: Path, name: str) -> dict:
    """sweep.json of an earlier attempt ({} for a new sweep); a folder that holds something else is refused."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return {}
    if not root.is_dir():
        raise RunFolderError(f"{root}: exists and is not a folder; choose another --output-dir")
    state = _read_json(root / SWEEP_JSON)
    if not isinstance(state, dict):
        raise RunFolderError(f"{root}: not a prefopt sweep folder (no {SWEEP_JSON}) and not empty; a sweep writes "
                             "only into a folder it made: choose another --output-dir")
    if state.get("recipe_name") not in (None, name):
        raise RunFolderError(f"{root}: holds the sweep of recipe '{state['recipe_name']}', this one is '{name}'; "
                             "choose another --output-dir")
    return state


def _foreign_folders(root: Path, points: list[Point], state: dict) -> list[str]:
    made = set(state.get("made", []))
    return [f"{root / p.folder}: exists and was not made by this sweep; a sweep never writes into a folder it did "
            "not create: move it away or choose another --output-dir"
            for p in points if p.folder not in made and (root / p.folder).exists()
            and (not (root / p.folder).is_dir() or any((root / p.folder).iterdir()))]


def run_sweep(prep: Prepared, *, echo=print) -> SweepResult:
    """Run every point not finished yet, one after another, then write the table (also after an interrupt)."""
    root, state = prep.root, prep.state
    root.mkdir(parents=True, exist_ok=True)
    _save(root, state)
    for line in prep.notes:
        echo(f"prefopt: sweep: {line}")
    n = len(prep.points)
    echo(f"prefopt: sweep {state['recipe_name']}: {n} point{'s' if n != 1 else ''} in {root}"
         + (f", best by {prep.selection.describe()}" if prep.selection else ""))
    try:
        for p in prep.points:
            _run_point(prep, p, echo)
    except KeyboardInterrupt:  # (a signal, a closed console): the table of what is done, no W&B run on the way out
        _finish(prep, echo, track=False)
        raise
    return _finish(prep, echo)


def _run_point(prep: Prepared, p: Point, echo) -> None:
    root, state = prep.root, prep.state
    rec = state["points"].setdefault(p.folder, {})
    identity = identity_of(p)
    head = f"prefopt: sweep point {p.index}/{len(prep.points)} {p.folder} ({p.label()})"
    if rec.get("status") in FINISHED and rec.get("identity") == identity \
            and runfolder.read_manifest(root / p.folder) is not None:
        echo(f"{head}: {rec['status']} earlier, skipped")
        return
    echo(f"{head}")
    if p.folder not in state["made"]:
        state["made"].append(p.folder)
    rec.update(folder=p.folder, overrides=p.overrides, identity=identity, status="running", started_at=now(),
               attempts=rec.get("attempts", 0) + 1)
    rec.pop("error", None)
    _save(root, state)
    t0 = time.monotonic()
    try:
        run_pipeline(p.recipe, output_dir=root / p.folder, echo=echo,
                     sweep={"folder": str(root.resolve()), "point": p.folder, "overrides": p.overrides,
                            "group": state["group"]})
        rec["status"] = "done"
    except GateFailed as e:
        rec.update(status="gate failed", error=_first_line(e))
        echo(f"prefopt: sweep point {p.folder}: a gate failed ({_first_line(e)}); the sweep goes on")
    except PrefoptError as e:
        rec.update(status="failed", error=_first_line(e), exit_code=getattr(e, "exit_code", EXIT_USER))
        echo(f"prefopt: sweep point {p.folder} failed: {_first_line(e)}; the sweep goes on")
    except KeyboardInterrupt:
        rec["status"] = "interrupted"
        raise
    except Exception as e:  # a bug in one point: recorded with its traceback, the others still run
        log = _traceback_log(root, p, e)
        rec.update(status="failed", error=f"unexpected error (a bug, please report it): {type(e).__name__}: "
                   f"{_first_line(e)}; traceback in {log}", exit_code=EXIT_BUG)
        echo(f"prefopt: sweep point {p.folder} failed: {rec['error']}; the sweep goes on")
    finally:
        rec.update(ended_at=now(), wall_s=round(time.monotonic() - t0, 2),
                   stages=_how_stages_came(root / p.folder))
        _save(root, state)
        forget_committed()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _traceback_log(root: Path, p: Point, e: BaseException) -> Path:
    path = root / "logs" / f"{p.folder}-traceback.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    return path


def _how_stages_came(run_dir: Path) -> dict[str, str]:
    """Each finished stage of a point: trained, resumed (trained from a checkpoint of an interrupted attempt) or
    reused (from the shared store: another point trained it)."""
    out = {}
    for st in (runfolder.read_manifest(run_dir) or {}).get("stages", []):
        if st.get("status") == "done":
            out[st["name"]] = ("reused" if st.get("reused_from") else
                               "resumed" if st.get("resumed_from_step") else "trained")
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save(root: Path, state: dict) -> None:
    write_atomic(root / SWEEP_JSON, json.dumps(state, indent=2, default=str))


def collect(root: Path, state: dict, points: list[Point], sel: Selection | None) -> SweepResult:
    """The table of the sweep's current points, read from their folders."""
    keys = [k for k, _ in state["grid"]]
    rows = []
    for p in points:
        rec = {"folder": p.folder, "overrides": p.overrides, **state["points"].get(p.folder, {})}
        rows.append(table.point_row(root, rec))
    table.mark_best(rows, sel)
    return SweepResult(root, rows, sel, keys, grid_labels(keys))


def _finish(prep: Prepared, echo, track: bool = True) -> SweepResult:
    """The table: on the console, sweep.csv, sweep.html, and (W&B on) in the sweep's group."""
    state = prep.state
    result = collect(prep.root, state, prep.points, prep.selection)
    cols = table.columns(result.rows, result.grid_keys)
    write_atomic(result.csv, table.to_csv(result.rows, cols))
    trained = sum(len(r["trained"].split()) for r in result.rows)
    reused = sum(len(r["reused"].split()) for r in result.rows)
    lines = [f"recipe {state['recipe']}; grid {', '.join(f'{k}: {v}' for k, v in state['grid'])}",
             f"{len(result.rows)} point{'s' if len(result.rows) != 1 else ''}; stages trained {trained}, reused from "
             f"the shared store {reused} (over every attempt)",
             "best point by " + (prep.selection.describe() if prep.selection else "-") + ": "
             + (result.best["point"] if result.best else "none (no finished point has the metric)")]
    write_atomic(result.html, table.to_html(result.rows, cols, title=f"prefopt sweep {state['recipe_name']}",
                                            lines=lines))
    echo(f"prefopt: sweep: {lines[1]}; {lines[2]}")
    if track and prep.points and prep.points[0].recipe is not None:
        tracking.log_sweep(prep.points[0].recipe.tracking.wandb, run_dir=prep.root, group=state["group"],
                           name=f"{state['recipe_name']}-sweep", columns=cols,
                           rows=[[table.cell(r.get(c)) for c in cols] for r in result.rows],
                           best=result.best["point"] if result.best else None)
    return result
