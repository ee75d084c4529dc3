"""Load and normalise stage data: read rows, check every row, convert to TRL's formats, split.

SFT rows: `messages` (chat), Alpaca (`instruction`/`input`/`output`) or plain `text`.
Preference rows: `prompt`/`chosen`/`rejected`, each a string or a list of messages.
Local JSONL/JSON/Parquet/CSV files are read here (so a malformed row is named by file and row);
anything else is a `datasets` hub id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .config import PREFERENCE_TYPES, DataError, RecipeError, looks_local, resolve_path

SFT_FORMATS = {"messages": ("messages",), "alpaca": ("instruction", "output"), "text": ("text",)}
PREF_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class StageData:
    train: "object"  # datasets.Dataset
    eval: "object | None"
    fmt: str
    files: list[str]


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; anything else is named by file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None


def _read_local(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} row {i}: not valid JSON ({e.msg}); each line must be one JSON object")
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})")
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"train": [...]} / {"data": [...]}
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        return obj
    if suffix == ".csv":
        import csv
        import io

        return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .parquet or .csv")


def read_rows(path: str, *, split: str = "train", base_dir: Path | None = None) -> tuple[list[dict], str]:
    """Rows of a data source and a label for messages (the resolved file, or the hub id)."""
    if looks_local(path):
        p = resolve_path(path, base_dir)
        if p is None:
            raise DataError(f"data file not found: {path}")
        return _read_local(p), str(p)
    from datasets import load_dataset

    try:
        ds = load_dataset(path, split=split)
    except Exception as e:  # the hub/network path: report, don't trace
        raise DataError(f"cannot load dataset '{path}' (split {split}): {str(e).splitlines()[0]}")
    return ds.to_list(), f"{path}[{split}]"


def _is_messages(v) -> bool:
    return (
        isinstance(v, list)
        and len(v) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)
    )


def detect_sft_format(row: dict) -> str | None:
    for fmt, keys in SFT_FORMATS.items():
        if all(k in row for k in keys):
            return fmt
    return None


def normalise_sft(rows: list[dict], label: str) -> tuple[list[dict], str]:
    """To TRL's conversational `messages` format (or `text` for plain text). Every bad row is named."""
    if not rows:
        raise DataError(f"{label}: no rows")
    fmt = detect_sft_format(rows[0])
    if fmt is None:
        raise DataError(
            f"{label} row 1: not an SFT row; expected `messages` (chat), `instruction`/`output` (Alpaca) or `text`, "
            f"got keys {sorted(rows[0])}"
        )
    problems, out = [], []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            problems.append(f"{label} row {i}: not an object")
            continue
        missing = [k for k in SFT_FORMATS[fmt] if row.get(k) in (None, "", [])]
        if missing:
            problems.append(f"{label} row {i}: missing or empty {', '.join(missing)} (format: {fmt})")
            continue
        if fmt == "messages":
            if not _is_messages(row["messages"]):
                problems.append(f"{label} row {i}: `messages` must be a list of {{role, content}} objects")
                continue
            out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]})
        elif fmt == "alpaca":
            user = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
            out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]})
        else:
            if not isinstance(row["text"], str):
                problems.append(f"{label} row {i}: `text` must be a string")
                continue
            out.append({"text": row["text"]})
    if problems:
        raise DataError(_join(problems))
    return out, fmt


def normalise_preference(rows: list[dict], label: str) -> tuple[list[dict], str]:
    """To TRL's preference format: strings stay strings; message lists become conversational
    (prompt = the messages before the answer, chosen/rejected = the assistant turn(s))."""
    if not rows:
        raise DataError(f"{label}: no rows")
    problems, out = [], []
    kinds = set()
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            problems.append(f"{label} row {i}: not an object")
            continue
        missing = [k for k in PREF_KEYS if k not in row or row[k] in (None, "", [])]
        if missing:
            problems.append(
                f"{label} row {i}: missing {', '.join(missing)}; preference rows need prompt, chosen and rejected"
            )
            continue
        vals = [row[k] for k in PREF_KEYS]
        if all(isinstance(v, str) for v in vals):
            kinds.add("standard")
            out.append({k: row[k] for k in PREF_KEYS})
        elif all(isinstance(v, str) or _is_messages(v) for v in vals):
            kinds.add("conversational")
            conv = {k: ([{"role": "user" if k == "prompt" else "assistant", "content": v}] if isinstance(v, str) else
                        [{"role": m["role"], "content": m["content"]} for m in v]) for k, v in zip(PREF_KEYS, vals)}
            for k in ("chosen", "rejected"):  # UltraFeedback-style rows repeat the prompt inside each answer
                if len(conv[k]) > len(conv["prompt"]) and conv[k][: len(conv["prompt"])] == conv["prompt"]:
                    conv[k] = conv[k][len(conv["prompt"]):]
            out.append(conv)
        else:
            problems.append(f"{label} row {i}: prompt/chosen/rejected must be strings or lists of {{role, content}}")
    if len(kinds) > 1:
        problems.append(f"{label}: rows mix plain strings and message lists; use one form for the whole file")
    if problems:
        raise DataError(_join(problems))
    return out, kinds.pop()


def _join(problems: list[str], limit: int = 20) -> str:
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  ".join(shown) + more


def load_stage_data(stage, *, seed: int, base_dir: Path | None = None) -> StageData:
    """Read, check, normalise and split one stage's data."""
    from datasets import Dataset

    normalise = normalise_preference if stage.type in PREFERENCE_TYPES else normalise_sft
    rows, label = read_rows(stage.data.path, split=stage.data.split, base_dir=base_dir)
    _check_hash(label, stage.data.sha256, "sha256")
    rows, fmt = normalise(rows, label)
    files = [label]
    train = Dataset.from_list(rows)
    eval_ds = None
    if stage.data.eval_path:
        erows, elabel = read_rows(stage.data.eval_path, split=stage.data.split, base_dir=base_dir)
        _check_hash(elabel, stage.data.eval_sha256, "eval_sha256")
        eval_ds = Dataset.from_list(normalise(erows, elabel)[0])
        files.append(elabel)
    elif stage.data.eval_fraction > 0 and len(train) >= 2:
        n_eval = max(1, round(len(train) * stage.data.eval_fraction))
        if n_eval >= len(train):
            raise DataError(f"eval_fraction {stage.data.eval_fraction:g} of {len(train)} rows ({label}) holds out "
                            f"{n_eval} and leaves no training row; lower it", key="eval_fraction")
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, eval_ds = parts["train"], parts["test"]
    if stage.data.max_samples:
        train = train.select(range(min(stage.data.max_samples, len(train))))
    return StageData(train=train, eval=eval_ds, fmt=fmt, files=files)


def data_problem(recipe, i: int, e: DataError) -> str:
    """A stage's data error with its key path and line: stages[i].data (line N) or stages[i].data.<key>."""
    if e.key:
        return f"{recipe.locate('stages', i, 'data', e.key)}: {e}"
    line = recipe._lines.get(("stages", i, "data", "path"))
    where = f" ({recipe._source} line {line})" if recipe._source and line else ""
    return f"stages[{i}].data{where}: {e}"


def check_recipe_data(recipe) -> None:
    """Every stage's data problems, all at once (RecipeError), before any training starts."""
    problems = []
    for i, st in enumerate(recipe.stages):
        try:
            load_stage_data(st, seed=recipe.seed, base_dir=recipe._base_dir)
        except DataError as e:
            problems.append(data_problem(recipe, i, e))
    if problems:
        raise RecipeError(problems, recipe._source)


def _check_hash(label: str, expected: str | None, key: str) -> None:
    if expected and file_hash(label) != expected:
        raise DataError(f"{label} changed since the run that recorded it (content hash {file_hash(label)}, recorded "
                        f"{expected}); restore the file, or remove {key} to train on the new content", key=key)


def file_hash(label: str) -> str:
    """Content hash of a local data file (hub ids hash their name)."""
    p = Path(label)
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(label.encode())
    return h.hexdigest()[:16]
