"""Write docs/recipe-reference.md from the recipe schema (prefopt/config/schema.py), so the reference cannot drift.

    python scripts/recipe_reference.py           # (re)write docs/recipe-reference.md
    python scripts/recipe_reference.py --check   # exit 1 when the file differs from what would be written

Every key, type, default and description is read from the pydantic models: one table per recipe section.
tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import annotated_types as at  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from prefopt.config import schema  # noqa: E402

OUT = ROOT / "docs" / "recipe-reference.md"
STAGE_CLASSES = dict(schema.STAGE_TYPES)

STAGES_HEADING = "stages: keys every stage has"
# (heading, model, the YAML path its keys sit under, fields to leave out)
SECTIONS: list[tuple[str, type[BaseModel], str, tuple[str, ...]]] = [
    ("Top-level keys", schema.Recipe, "", ()),
    ("model", schema.ModelSection, "model.", ()),
    ("adapter", schema.AdapterSection, "adapter.", ()),
    (STAGES_HEADING, schema._StageBase, "stages[i].", ()),
    ("stages[i].data", schema.DataSection, "stages[i].data.", ()),
    ("stages[i].data.path as a mixture (a list of sources)", schema.SourceSection, "stages[i].data.path[j].", ()),
    ("stages[i].data.quality", schema.QualitySection, "stages[i].data.quality.", ()),
    ("stages[i].data.quality.reference_filter", schema.ReferenceFilterSection,
     "stages[i].data.quality.reference_filter.", ()),
    ("stages[i].train", schema.TrainSection, "stages[i].train.", ()),
    ("stages[i].train.early_stopping", schema.EarlyStoppingSection, "stages[i].train.early_stopping.", ()),
    ("tracking", schema.TrackingSection, "tracking.", ()),
    ("tracking.wandb", schema.WandbSection, "tracking.wandb.", ()),
    ("merge", schema.MergeSection, "merge.", ()),
    ("eval", schema.EvalSection, "eval.", ()),
    ("eval.mmlu", schema.MMLUSection, "eval.mmlu.", ()),
    ("eval.completions", schema.CompletionsSection, "eval.completions.", ()),
    ("eval.gates", schema.GatesSection, "eval.gates.", ()),
]
# where each nested section's table is, for the type column
SECTION_OF = {model: heading for heading, model, _, _ in SECTIONS}
SECTION_OF.update({cls: f"stages: type {t}" for t, cls in STAGE_CLASSES.items()})


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return "#" + kept.replace(" ", "-")


def type_name(tp) -> str:
    """A field's type as a recipe writer reads it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = list(dict.fromkeys(type_name(a) for a in args if a is not type(None)))
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp in STAGE_CLASSES.values():
            return f"stage ([stages]({anchor(STAGES_HEADING)}))"
        heading = SECTION_OF.get(tp)
        return f"section ([{heading}]({anchor(heading)}))" if heading else "section"
    if tp is typing.Any:
        return "any"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def bounds(field) -> str:
    """The field's range (gt/ge/lt/le, a minimum length), as ' (> 0)'."""
    marks = {at.Gt: (">", "gt"), at.Ge: (">=", "ge"), at.Lt: ("<", "lt"), at.Le: ("<=", "le")}
    parts = []
    for meta in field.metadata:
        for cls, (sign, attr) in marks.items():
            if isinstance(meta, cls):
                parts.append(f"{sign} {getattr(meta, attr)}")
        if isinstance(meta, at.MinLen):
            parts.append(f"at least {meta.min_length}")
    return f" ({', '.join(parts)})" if parts else ""


def scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {scalar(v)}" for k, v in value.items()) + "}"
    return repr(value)


def default_of(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "its defaults"
        return f"`{scalar(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{scalar(field.default)}`"


def cell(text: str) -> str:
    """Table-cell text: one line, `|` escaped, `<` escaped (GitHub would read `<name>` as an HTML tag)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def table(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
          after: dict[str, str] | None = None) -> list[str]:
    """One row per field: key, type (and range), default, description; `after` adds a row after a named one."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if name in skip or (only is not None and name not in only):
            continue
        rows.append(f"| `{prefix}{name}` | {type_name(field.annotation)}{bounds(field)} | {default_of(field)} | "
                    f"{cell(field.description or '')} |")
        if after and name in after:
            rows.append(after[name])
    return rows


def intro(model: type[BaseModel]) -> list[str]:
    doc = model.__doc__
    if not doc or model.__module__ != schema.__name__ or doc.startswith(("!!!", "Usage docs")):
        return []
    return [" ".join(doc.split()), ""]


def stage_sections() -> list[str]:
    out: list[str] = []
    base = set(schema._StageBase.model_fields)
    for t, cls in STAGE_CLASSES.items():
        extra = tuple(n for n in cls.model_fields if n not in base and n != "type")
        out += [f"### stages: type {t}", ""]
        if not extra:
            out += [f"`type: {t}` stages have only the keys every stage has.", ""]
            continue
        out += [f"Keys of `type: {t}` stages besides those every stage has:", ""]
        out += table(cls, "stages[i].", only=extra) + [""]
    return out


def render() -> str:
    """The whole of docs/recipe-reference.md."""
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by scripts/recipe_reference.py from prefopt/config/schema.py: do not edit by hand. -->",
        "",
        "Every key a recipe may hold, with its type, default and description, read from the recipe schema "
        "(`prefopt/config/schema.py`). Regenerate with `python scripts/recipe_reference.py`; "
        "`tests/test_docs.py` fails when this page is out of date. The guide to what the keys do together is "
        "[recipes.md](recipes.md); `prefopt plan RECIPE --show-recipe` prints a recipe with every default filled in.",
        "",
        "Keys are written as YAML paths: `stages[i].` is any entry of the `stages` list. A section whose default is "
        "`null` is off unless the recipe has it; *its defaults* means the section is on with the defaults below.",
        "",
        "## Sections",
        "",
    ]
    lines += [f"- [{h}]({anchor(h)})" for h, _, _, _ in SECTIONS[:4]]
    lines += [f"- [stages: type {t}]({anchor(f'stages: type {t}')})" for t in STAGE_CLASSES]
    lines += [f"- [{h}]({anchor(h)})" for h, _, _, _ in SECTIONS[4:]]
    lines.append("")
    for heading, model, prefix, skip in SECTIONS:
        lines += [f"## {heading}", ""] + intro(model)
        if model is schema._StageBase:
            lines += ["`type` picks the stage's trainer; each type's own keys follow this table.", ""]
            types_ = " \\| ".join(STAGE_CLASSES)
            type_row = (f"| `{prefix}type` | {types_} | required | "
                        f"{cell(schema.SFTStage.model_fields['type'].description or '')} |")
            lines += table(schema._StageBase, prefix, skip, after={"name": type_row}) + [""]
            lines += stage_sections()
            continue
        lines += table(model, prefix, skip) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else None
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/recipe_reference.py", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(ROOT)} is current")
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
