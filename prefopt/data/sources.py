"""Reading data sources: local JSONL/JSON/Parquet/CSV files are read here (so a malformed row is named by file and
row); anything else is a `datasets` hub id. Content hashes of what was read.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import looks_local, resolve_path
from ..errors import DataError
from ..runs.folder import file_hash


def read_text(path: Path) -> str:
    """The file as UTF-8 text; anything else is named by file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's CSV export) is not part of the first key
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None


def _read_local(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} row {i}: not valid JSON ({e.msg}); each line must be one JSON object") \
                    from None
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"train": [...]} / {"data": [...]}
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        return obj
    if suffix == ".csv":
        import csv
        import io

        return list(csv.DictReader(io.StringIO(read_text(path), newline="")))
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
        raise DataError(f"cannot load dataset '{path}' (split {split}): {str(e).splitlines()[0]}") from None
    return ds.to_list(), f"{path}[{split}]"


def check_hash(label: str, expected: str | None, key: str) -> None:
    if expected and file_hash(label) != expected:
        raise DataError(f"{label} changed since the run that recorded it (content hash {file_hash(label)}, recorded "
                        f"{expected}); restore the file, or remove {key} to train on the new content", key=key)


