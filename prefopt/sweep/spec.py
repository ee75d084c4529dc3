"""What a sweep is: the recipe, the grid (from --grid, the recipe's `sweep:` section or a sweep file), the metric that
picks the best point, and the points -- each a recipe of its own, checked in full before any point starts.

A sweep file (`prefopt sweep sweep.yaml`):
    recipe: recipes/demo.yaml          # relative to the sweep file
    grid: {stages.dpo.beta: [0.05, 0.1, 0.3], adapter.r: [8, 16]}
    select: eval/rewards/accuracies:max
    max_points: 64
    set: {eval.mmlu.limit: 10}         # fixed overrides of every point (as --set)
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..advice import stage_metrics
from ..config import SWEEP_MAX_POINTS, Recipe, apply_overrides, fmt_path, load_recipe
from ..errors import PrefoptError, RecipeError
from ..preflight import preflight
from ..runs import store

# keys the sweep sets itself on every point: a grid over them would be undone
RESERVED = ("name", "sweep", "tracking.wandb.group")
SWEEP_FILE_KEYS = ("recipe", "grid", "select", "max_points", "set")
DEFAULT_SELECT = "eval/loss"  # of the last stage, min


@dataclass
class Point:
    """One combination of the grid: its folder name, its overrides (key -> value) and its recipe."""

    index: int  # 1-based
    folder: str
    overrides: dict[str, Any]
    recipe: Recipe | None = None

    def label(self) -> str:
        return " ".join(f"{k}={_show(v)}" for k, v in self.overrides.items())


@dataclass
class SweepSpec:
    """A sweep before it is checked: where the recipe is, the grid, fixed overrides, the selection and the cap."""

    recipe: Path
    grid: list[tuple[str, list[Any]]] = field(default_factory=list)
    sets: dict[str, Any] = field(default_factory=dict)  # fixed overrides of every point (--set, the file's set:)
    select: str | None = None
    max_points: int | None = None
    origin: dict[str, str] = field(default_factory=dict)  # grid key -> where it was given (--grid, sweep.grid)


@dataclass
class Selection:
    """The metric that marks the best point: [stage/]metric and min or max."""

    metric: str
    mode: str
    stage: str | None = None  # None: the last stage that logs it (a per-stage metric), or a run-wide one

    def describe(self) -> str:
        return f"{self.stage + '/' if self.stage else ''}{self.metric} ({self.mode})"


def _show(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, list) else str(v)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _value(v: Any) -> Any:
    """A value as YAML read it, with 2e-3 / 1e4 a number (YAML 1.1 reads a float without a dot as text)."""
    return float(v) if isinstance(v, str) and _NUMBER.fullmatch(v.strip()) else v


def grid_values(key: str, values: Any, where: str = "grid") -> list[Any]:
    """A key's values as the Python API or a sweep file gives them: a list (or tuple), or the command line's text
    "V1,V2"; anything else is refused with the key named."""
    if isinstance(values, str):
        return parse_grid_item(f"{key}={values}")[1]
    if not isinstance(values, (list, tuple)):
        raise RecipeError([f"{where} {key}: expected a list of values, e.g. {{{key!r}: [V1, V2]}} or "
                           f"{{{key!r}: 'V1,V2'}}; got {type(values).__name__} {values!r}"])
    return [_value(v) for v in values]


def parse_grid_item(item: str) -> tuple[str, list[Any]]:
    """`--grid KEY=V1,V2,V3` (each value read as YAML) or `--grid KEY=[V1, V2]` (a YAML list: values that hold
    commas, lists)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError([f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid stages.dpo.beta=0.05,0.1,0.3"])
    text = text.strip()
    try:
        if text.startswith("["):
            values = yaml.safe_load(text)
        else:
            values = [yaml.safe_load(v.strip()) for v in text.split(",") if v.strip()]
    except yaml.YAMLError as e:
        raise RecipeError([f"--grid {key}: a value is not valid YAML ({str(e).splitlines()[0]}); quote it"]) from None
    if not isinstance(values, list):
        raise RecipeError([f"--grid {key}: expected a list of values, e.g. {key}=1,2 or {key}='[1, 2]'"])
    return key, [_value(v) for v in values]


def read_sweep_file(path: Path) -> SweepSpec | None:
    """A sweep file's spec, or None when the file is a recipe (it has no top-level `recipe:` key)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # load_recipe says what is wrong with it
    if not isinstance(raw, dict) or "recipe" not in raw or "stages" in raw:
        return None
    problems = [f"{k}: unknown key of a sweep file (keys: {', '.join(SWEEP_FILE_KEYS)})" for k in raw
                if k not in SWEEP_FILE_KEYS]
    recipe = path.parent / str(raw["recipe"])
    if not recipe.is_file():
        problems.append(f"recipe: file not found: {recipe} (a path relative to the sweep file)")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        problems.append("grid: expected key: [values], e.g. grid: {stages.dpo.beta: [0.05, 0.1]}")
        grid = {}
    sets = raw.get("set") or {}
    if not isinstance(sets, dict):
        problems.append("set: expected key: value, e.g. set: {eval.mmlu.limit: 10}")
        sets = {}
    if problems:
        raise RecipeError(problems, str(path))
    spec = SweepSpec(recipe, [(str(k), [_value(x) for x in v]) for k, v in grid.items()], sets, raw.get("select"),
                     raw.get("max_points"), {str(k): f"{path} grid" for k in grid})
    return spec


def merged_spec(spec: SweepSpec, section, grid_items: list[str], select: str | None,
                max_points: int | None) -> SweepSpec:
    """The spec with the recipe's `sweep:` section under it and the command line over it (a --grid key replaces the
    same key's values)."""
    grid = dict(spec.grid)
    origin = dict(spec.origin)
    if section is not None:
        for k, v in section.grid.items():
            if k not in grid:
                grid[k], origin[k] = [_value(x) for x in v], "the recipe's sweep.grid"
        spec.select = spec.select or section.select
        spec.max_points = spec.max_points or section.max_points
    seen: set[str] = set()
    problems = []
    for item in grid_items:
        key, values = parse_grid_item(item)
        if key in seen:
            problems.append(f"--grid {key}: given twice; give every value in one --grid {key}=V1,V2,...")
        seen.add(key)
        grid[key], origin[key] = values, "--grid"
    if problems:
        raise RecipeError(problems)
    spec.grid = list(grid.items())
    spec.origin = origin
    spec.select = select or spec.select
    spec.max_points = max_points or spec.max_points
    return spec


def grid_problems(spec: SweepSpec) -> list[str]:
    problems = []
    if not spec.grid:
        problems.append("the grid is empty: give --grid KEY=V1,V2 (e.g. --grid stages.dpo.beta=0.05,0.1,0.3), a "
                        "sweep: section in the recipe, or a sweep file")
    for key, values in spec.grid:
        where = spec.origin.get(key, "--grid")
        if any(key == r or key.startswith(r + ".") for r in RESERVED):
            problems.append(f"{where} {key}: the sweep sets this itself on every point; sweep another key")
        if not values:
            problems.append(f"{where} {key}: no values; give at least one, e.g. {key}=V1,V2")
        shown = [repr(v) for v in values]
        twice = sorted({s for s in shown if shown.count(s) > 1})
        if twice:
            problems.append(f"{where} {key}: {', '.join(twice)} given more than once; give each value once")
    n = 1
    for _, values in spec.grid:
        n *= max(len(values), 1)
    cap = spec.max_points or SWEEP_MAX_POINTS
    if n > cap:
        problems.append(f"the grid has {n} points, more than the cap of {cap}; shrink the grid or raise the cap "
                        "(--max-points N, or sweep.max_points)")
    return problems


def same_field_problems(spec: SweepSpec) -> list[str]:
    """Two grid keys that name one recipe field (stages.1.beta and stages.dpo.beta; adapter and adapter.r), or a
    grid key that a fixed --set also sets: the later would silently undo the earlier on every point."""
    try:
        raw = yaml.safe_load(Path(spec.recipe).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # load_recipe says what is wrong with it
    if not isinstance(raw, dict):
        return []
    named = [(k, spec.origin.get(k, "--grid")) for k, _ in spec.grid] + [(k, "--set") for k in spec.sets]
    paths = []
    for key, where in named:
        given: dict = {}
        apply_overrides(copy.deepcopy(raw), {key: None}, given, [])
        if given:
            paths.append((key, where, next(iter(given))))
    problems = []
    for i, (a, wa, pa) in enumerate(paths):
        for b, wb, pb in paths[i + 1:]:
            if wa == wb == "--set" or pa[:len(pb)] != pb[:len(pa)]:
                continue
            same = f"both name {fmt_path(pa)}" if pa == pb else f"{fmt_path(max(pa, pb, key=len))} is inside " \
                f"{fmt_path(min(pa, pb, key=len))}"
            fix = "give its values once" if wb != "--set" else "sweep it or fix it, not both"
            problems.append(f"{wa} {a} and {wb} {b}: {same}; the later would undo the earlier on every point: {fix}")
    return problems


def grid_labels(keys: list[str]) -> list[str]:
    """Each grid key's short label: its last part (beta, r) unless two keys share it (then the whole key)."""
    last = [k.split(".")[-1] for k in keys]
    return [k if last.count(x) > 1 else x for k, x in zip(keys, last)]


def folder_names(grid: list[tuple[str, list[Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Every point: its folder name (NN-label=value_label=value) and overrides, in grid order. A label is the key's
    last part (beta, r) unless two keys share it."""
    labels = grid_labels([k for k, _ in grid])
    out = []
    for i, combo in enumerate(itertools.product(*[values for _, values in grid]), start=1):
        overrides = {k: v for (k, _), v in zip(grid, combo)}
        parts = [f"{label}={_safe(_show(v))}" for label, v in zip(labels, combo)]
        out.append((f"{i:02d}-" + "_".join(parts), overrides))
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)[:24] or "-"


def _relabel(problem: str, key: str, where: str) -> str:
    return problem.replace(f"(from --set {key}=", f"(from {where} {key}=").replace(f"--set {key}", f"{where} {key}")


def check_points(spec: SweepSpec, base_name: str, fixed: dict[str, Any]) -> tuple[list[Point], list[str]]:
    """Every point's recipe (the grid's values and the sweep's own settings over the recipe), and the problems:
    each single value's first (a key that is no recipe field, a value of the wrong type), then each point's whole
    recipe through preflight (the checks `prefopt run` makes before a model loads), each problem once."""
    problems: list[str] = []
    for key, values in spec.grid:
        found: dict[str, list] = {}  # the same problem for several values: one line naming them
        for v in values:
            try:
                load_recipe(spec.recipe, _overrides(spec.sets, {key: v}))
            except RecipeError as e:
                for p in e.problems:
                    found.setdefault(_relabel(p, key, spec.origin.get(key, "--grid")).split(" (from ")[0], []).append(v)
        where = spec.origin.get(key, "--grid")
        problems += [f"{p} (from {where} {key}={','.join(_show(v) for v in vs)})" if not p.startswith(where) else p
                     for p, vs in found.items()]
    if problems:
        return [], _unique(problems)
    points = []
    found: dict[str, list[str]] = {}  # a problem -> the points that have it
    for i, (folder, overrides) in enumerate(folder_names(spec.grid), start=1):
        point = Point(i, folder, overrides)
        try:
            rec = load_recipe(spec.recipe, _overrides(spec.sets, overrides, {**fixed, "name": f"{base_name}-p{i:02d}"}))
            preflight(rec)
            point.recipe = rec
        except RecipeError as e:
            for p in e.problems:
                for key, _ in spec.grid:
                    p = _relabel(p, key, spec.origin.get(key, "--grid"))
                found.setdefault(p, []).append(folder)
        except PrefoptError as e:
            found.setdefault(str(e).splitlines()[0], []).append(folder)
        points.append(point)
    # a problem of every point is the recipe's: said once; one of some points names them
    problems += [p if len(where) == len(points) else f"point{'s' if len(where) > 1 else ''} {', '.join(where)}: {p}"
                 for p, where in found.items()]
    return points, problems


def _overrides(sets: dict[str, Any], grid: dict[str, Any], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fixed --set items, then the point's grid values, then what the sweep sets itself."""
    return {**sets, **grid, **(fixed or {})}


def parse_set_items(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a dict (each value read as YAML, as `prefopt run --set` reads it)."""
    out, problems = {}, []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. stages.dpo.beta=0.2")
            continue
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problems.append(f"--set {key}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it")
    if problems:
        raise RecipeError(problems)
    return out


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def shared_store(recipe: Recipe, root: Path) -> tuple[str | None, str | None]:
    """(cache_dir to set on every point or None, a line saying why): the shared store is where points reuse each
    other's stages; when it is off, the sweep keeps one of its own."""
    if store.shared_dir(recipe.cache_dir) is not None:
        return None, None
    own = root / "store"
    return str(own.resolve()), (f"the shared cache is off (cache_dir: off or PREFOPT_CACHE_DIR=off): the sweep keeps "
                                f"the stages its points share in {own}")


# ---------------------------------------------------------------------------------------------- selection

RUN_METRICS = ("mmlu_delta", "train_time_s")


def point_metrics(recipe: Recipe) -> list[str]:
    """The metrics a point of this recipe will have in the sweep table: <stage>/eval/<m> for what each stage's trainer
    logs on its held-out rows, <stage>/train/loss, and the run's mmlu_delta (when evaluated) and train_time_s."""
    out = []
    for st in recipe.stages:
        if st.data.eval_fraction > 0 or st.data.eval_path:
            out += [f"{st.name}/eval/{m}" for m in stage_metrics(st)]
        out.append(f"{st.name}/train/loss")
    if recipe.eval is not None and recipe.eval.mmlu is not None:
        out.append("mmlu_delta")
    return out + ["train_time_s"]


def parse_select(text: str | None, points: list[Point]) -> tuple[Selection | None, list[str]]:
    """The selection, and a problem when no point will have the metric. `eval/rewards/accuracies` is the last stage
    that logs it; `dpo/eval/loss` that stage's."""
    recipes = [p.recipe for p in points if p.recipe is not None]
    if not recipes:
        return None, []
    text = text or DEFAULT_SELECT
    metric, _, mode = text.rpartition(":") if ":" in text else (text, "", "")
    if mode not in ("", "min", "max"):
        return None, [f"--select {text}: the mode after ':' must be min or max, e.g. {metric}:"
                      f"{'min' if 'loss' in metric else 'max'}"]
    mode = mode or ("min" if "loss" in metric or metric.endswith("time_s") else "max")
    names = {st.name for r in recipes for st in r.stages}
    stage, _, rest = metric.partition("/")
    sel = Selection(rest, mode, stage) if stage in names and rest else Selection(metric, mode)
    known = sorted({m for r in recipes for m in point_metrics(r)})
    if sel.stage is not None:
        found = f"{sel.stage}/{sel.metric}" in known
    else:
        found = sel.metric in known or any(m.split("/", 1)[1] == sel.metric for m in known if "/" in m)
    if found:
        return sel, []
    if text == DEFAULT_SELECT:  # the default on a recipe without held-out rows: the last stage's training loss
        return Selection("train/loss", "min"), []
    short = sorted({m.split("/", 1)[1] if "/" in m and m.split("/", 1)[0] in names else m for m in known})
    return None, [f"--select {text}: no point logs {metric}; choose one of: {', '.join(short)} (or "
                  f"<stage>/<metric>, e.g. {known[0]})"]
