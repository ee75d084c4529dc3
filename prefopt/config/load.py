"""Loading a recipe: YAML (safe_load only), --set overrides, and one RecipeError listing every problem at once,
each with its key path and YAML line."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError
from .locate import fmt_path, line_map, looks_local, resolve_path, where
from .schema import STAGE_TYPES, Recipe, _StageBase


def _model_at(loc: tuple, raw: Any) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (used to suggest key names)."""
    model: Any = Recipe
    node = raw
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if model == "stages":
                t = node.get("type") if isinstance(node, dict) else None
                model = STAGE_TYPES.get(t, _StageBase)
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        node = node.get(part) if isinstance(node, dict) else None
        if field is None:
            return None
        if part == "stages" and model is Recipe:
            model = "stages"
            continue
        ann = field.annotation
        # `eval: EvalSection | None` suggests EvalSection's keys too
        ann = next((a for a in (ann, *getattr(ann, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        model = ann
    return model if isinstance(model, type) else None


def _clean_loc(loc: tuple) -> tuple:
    # Discriminated unions insert the tag ('dpo') into the location; drop it.
    out = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and part in STAGE_TYPES and i > 0 and isinstance(loc[i - 1], int):
            continue
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):  # a union member ('str', 'list[...]')
            continue
        out.append(part)
    return tuple(out)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _union_errors(errors: list[dict]) -> list[dict]:
    """One error per key where a union (data.path: a string or a list of sources) reports each member's: the
    deepest wins; members that all fail at the key itself become one 'must be ...' error."""
    by_loc: dict[tuple, list[dict]] = {}
    for e in errors:
        by_loc.setdefault(_clean_loc(tuple(e["loc"])), []).append(e)
    out = []
    for loc, errs in by_loc.items():
        member = [e for e in errs if any(isinstance(p, str) and (p in _UNION_TAGS or "[" in p) for p in e["loc"])]
        if not member:
            out += errs
            continue
        deeper = any(o[: len(loc)] == loc and len(o) > len(loc) for o in by_loc)
        if deeper:
            continue
        if len(member) > 1 and loc[-1:] == ("path",):
            out.append({**member[0], "type": "union_path",
                        "msg": "must be a file path or hub id, or a list of sources ([{path: ..., fraction: 0.3}])"})
        else:
            out += errs
    return out


def _problems_from(err: ValidationError, raw: dict, lines: dict, source: str | None, overrides: dict | None = None,
                   locs: list | None = None) -> list[str]:
    """Each validation error as '<key path>: <what> (<file> line N)'; `locs` collects the key paths."""
    problems = []
    for e in _union_errors(err.errors()):
        loc = _clean_loc(tuple(e["loc"]))
        typ = e["type"]
        msg = e["msg"]
        if typ == "extra_forbidden":
            owner = _model_at(loc[:-1], raw)
            choices = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
            msg = "unknown key" + (f"; did you mean {close[0]}?" if close else "") + (
                f" (known keys: {', '.join(choices)})" if choices and not close else ""
            )
        elif typ == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            close = difflib.get_close_matches(str(tag), list(STAGE_TYPES), n=1)
            loc = loc + ("type",)
            msg = f"unknown stage type '{tag}'" + (f"; did you mean {close[0]}?" if close else "") + (
                f" (one of {', '.join(STAGE_TYPES)})"
            )
        elif typ == "union_tag_not_found":
            loc = loc + ("type",)
            msg = f"missing; every stage needs a type ({', '.join(STAGE_TYPES)})"
        elif typ == "missing":
            msg = "missing; this key is required"
        elif typ == "literal_error":
            import re as _re

            choices = _re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
            got = e.get("input")
            close = difflib.get_close_matches(str(got), choices, n=1) if not isinstance(got, list) else []
            msg = f"{msg}, got {got!r}" + (f"; did you mean {close[0]}?" if close else "") + (
                "; one value here, not a list" if isinstance(got, list) else "")
        elif typ == "value_error":
            msg = msg.removeprefix("Value error, ")
            if msg.startswith("@"):  # a model-level check naming the key below its model
                sub, _, msg = msg[1:].partition(": ")
                loc = loc + tuple(int(p) if p.isdigit() else p for p in sub.split("."))
            if msg.startswith("stages["):  # a model-level check that names its own path
                path, _, rest = msg.partition(": ")
                idx = int(path.split("[")[1].split("]")[0])
                problems.append(f"{path}: {rest}{where(('stages', idx, 'name'), lines, source, overrides)}")
                if locs is not None:
                    locs.append(())  # not one key's value: nothing to leave out
                continue
        else:
            got = e.get("input")
            if not isinstance(got, (dict, list)):
                msg = f"{msg}, got {got!r}"
        if locs is not None:
            locs.append(loc)
        problems.append(f"{fmt_path(loc)}: {msg}{where(loc, lines, source, overrides)}")
    return problems


def _repaired(raw: dict, locs: list[tuple]) -> Recipe | None:
    """The recipe with every bad key left out (so its default applies), if that validates; None otherwise (a
    required key was bad, or a check spans several keys)."""
    import copy

    if not locs or any(not loc for loc in locs):
        return None
    fixed = copy.deepcopy(raw)
    for loc in locs:
        node = fixed
        for part in loc[:-1]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                node = None
                break
        if isinstance(node, dict) and loc[-1] in node:
            del node[loc[-1]]
        elif node is not None:
            return None
    try:
        return Recipe.model_validate(fixed)
    except ValidationError:
        return None


def _parse_override(item: str) -> tuple[list, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError([f"--set {item!r}: expected KEY=VALUE, e.g. stages.1.beta=0.2"])
    path = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        return path, yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise RecipeError([f"--set {key}: the value is not valid YAML ({problem}); quote it, e.g. "
                           f"--set '{key}=\"...\"'"]) from None


def _list_item(node: list, part, key: str, upto: tuple) -> tuple[int | None, str | None]:
    """A list item by index, or (a stage) by its name: (index, None) or (None, the problem)."""
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if isinstance(part, int) and part < len(node):
        return part, None
    if not isinstance(part, int) and part in names:
        return names.index(part), None
    named = [str(n) for n in names if n is not None]
    how = (f"name one of {', '.join(named)}, or give an index 0-{len(node) - 1}" if named and len(named) == len(node)
           else f"give an index 0-{len(node) - 1}" if node else "the list is empty")
    close = difflib.get_close_matches(str(part), named, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return None, f"--set {key}: '{fmt_path(upto)}' has no item {part!r}; {hint}{how}"


def apply_overrides(raw: dict, overrides: dict | list | None, given: dict | None = None,
                    problems: list | None = None) -> dict:
    """Apply {"stages.1.beta": 0.2} or ["stages.dpo.beta=0.2"] to the raw recipe dict. A stage is named by its
    index or its name. `given` collects, per key path (indexes resolved), the --set item that set it. Overrides
    that name no key raise RecipeError, or are added to `problems` when a list is given (the rest still apply)."""
    collect = problems
    if not overrides:
        return raw
    if isinstance(overrides, (list, tuple)):
        items = [(*_parse_override(o), o) for o in overrides]
    else:
        items = [([int(p) if p.isdigit() else p for p in str(k).split(".")], v, f"{k}={v}")
                 for k, v in overrides.items()]
    problems = []
    for path, value, text in items:
        key = ".".join(map(str, path))
        node, resolved = raw, []
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                idx, problem = _list_item(node, part, key, tuple(resolved))
                if problem:
                    problems.append(problem)
                    node = None
                    break
                resolved.append(idx)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                resolved.append(part)
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                problems.append(f"--set {key}: '{fmt_path(tuple(resolved))}' is not a section")
                node = None
                break
        if node is not None and given is not None:
            given[tuple(resolved)] = text
    if collect is not None:
        collect += problems
    elif problems:
        raise RecipeError(problems)
    return raw


def check_paths(recipe: Recipe, base_dir: Path, lines: dict | None = None, source: str | None = None,
                overrides: dict | None = None) -> list[str]:
    """Local data files that do not exist. Paths are resolved against the recipe's folder, then the cwd."""
    problems = []
    for i, st in enumerate(recipe.stages):
        where_of = [(("path",) if isinstance(st.data.path, str) else ("path", j, "path"), src.path)
                    for j, src in enumerate(st.data.sources())]
        where_of.append((("eval_path",), st.data.eval_path))
        where_of += [(("quality", "decontaminate", j), p) for j, p in enumerate(st.data.quality.decontaminate)]
        for key, p in where_of:
            if p is None or not looks_local(p):
                continue
            if resolve_path(p, base_dir) is None:
                at = where(("stages", i, "data", *key), lines or {}, source, overrides)
                problems.append(
                    f"{fmt_path(('stages', i, 'data', *key))}: file not found: {p}{at}; give a path relative to "
                    "the recipe or the current folder, or a datasets hub id"
                )
    return problems











def validate_recipe(raw: Any, *, source: str | None = None, text: str | None = None, base_dir: Path | None = None,
                    overrides: dict | None = None) -> Recipe:
    """A validated Recipe, or RecipeError with every problem of the schema and the data paths (and the recipe with
    the bad values left out, for the checks that come after)."""
    lines = line_map(text) if text else {}
    overrides = overrides or {}
    if not isinstance(raw, dict):
        raise RecipeError(["the recipe must be a YAML mapping (name:, model:, stages:, ...)"], source)

    def placed(recipe: Recipe) -> Recipe:
        recipe._base_dir = base_dir or Path.cwd()
        recipe._lines = lines
        recipe._source = source
        recipe._overrides = overrides
        return recipe

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        locs: list = []
        problems = _problems_from(err, raw, lines, source, overrides, locs)
        repaired = _repaired(raw, locs)
        if repaired is not None:
            placed(repaired)
            problems += check_paths(repaired, base_dir or Path.cwd(), lines, source, overrides)
        raise RecipeError(problems, source, repaired) from None
    placed(recipe)
    problems = check_paths(recipe, base_dir or Path.cwd(), lines, source, overrides)
    if problems:
        raise RecipeError(problems, source, recipe)
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is recorded (PyYAML keeps the last
    value silently). Same constructors, same types: only the duplicate check is added."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []  # (key, first line, second line), 1-based

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append((key, seen[key], line))
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str):
    loader = _RecipeLoader(text)
    try:
        raw = loader.get_single_data()
    finally:
        loader.dispose()
    if loader.duplicates:
        by_line = {}
        for p, line in line_map(text).items():
            by_line.setdefault(line, []).append(p)
        problems = []
        for key, first, second in loader.duplicates:
            path = next((p for p in by_line.get(second, []) if p and p[-1] == key), (key,))
            problems.append(f"{fmt_path(path)}: duplicate key (lines {first} and {second}); YAML would silently keep "
                            "the last value: keep one")
        raise RecipeError(problems, source)
    return raw


def load_recipe(path: str | Path, overrides: dict | list | None = None) -> Recipe:
    """Load and validate a recipe file; raises RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"],
                          str(path)) from None
    try:
        raw = _load_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(e, 'problem', e)}"], str(path)) from None
    given: dict = {}
    bad_overrides: list = []
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, given, bad_overrides)
    if not bad_overrides:
        return validate_recipe(raw, source=str(path), text=text, base_dir=path.resolve().parent, overrides=given)
    try:  # the recipe's own problems too, in the same report
        recipe = validate_recipe(raw, source=str(path), text=text, base_dir=path.resolve().parent, overrides=given)
    except RecipeError as e:
        raise RecipeError(bad_overrides + e.problems, str(path), e.repaired) from None
    raise RecipeError(bad_overrides, str(path), recipe)


def recipe_from_dict(raw: dict, overrides: dict | list | None = None, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe built in code (a dict); same checks as load_recipe."""
    import copy

    given: dict = {}
    return validate_recipe(apply_overrides(copy.deepcopy(raw), overrides, given), base_dir=base_dir, overrides=given)
