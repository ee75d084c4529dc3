"""Where a recipe value came from: key paths as the user writes them, YAML lines, --set items, and local paths
resolved against the recipe's folder."""

from __future__ import annotations

from pathlib import Path

import yaml


def line_map(text: str) -> dict[tuple, int]:
    """Map key paths (tuples of str keys and int indexes) to 1-based YAML lines."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return lines


def where(loc: tuple, lines: dict, source: str | None, overrides: dict | None = None) -> str:
    """' (recipe.yaml line 14)' for a key, its nearest written parent's line, or ' (from --set k=v)'."""
    for cut in range(len(loc), 0, -1):
        if (overrides or {}).get(tuple(loc[:cut])):
            return f" (from --set {overrides[tuple(loc[:cut])]})"
    line = None
    for cut in range(len(loc), -1, -1):
        line = lines.get(tuple(loc[:cut]))
        if line:
            break
    return f" ({source} line {line})" if source and line else (f" (line {line})" if line else "")


def fmt_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(recipe)"


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_local(p: str) -> bool:
    """A data path is local if it has a data-file suffix or exists; otherwise it is a hub id."""
    return p.endswith(DATA_SUFFIXES) or p.startswith((".", "/", "~")) or Path(p).exists()


def resolve_path(p: str, base_dir: Path | None) -> Path | None:
    cand = Path(p).expanduser()
    for c in ([cand] if cand.is_absolute() else [Path.cwd() / cand] + ([base_dir / cand] if base_dir else [])):
        if c.exists():
            return c.resolve()
    return None
