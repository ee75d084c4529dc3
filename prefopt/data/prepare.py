"""The data step of one stage: read its sources (a mixture, seeded), normalise, filter, split, report.

Order, each filter seeing only the rows the ones before it kept:
  normalise (empty, invalid) -> identical_pair (text) -> exact_duplicate -> near_duplicate -> contaminated
  -> token checks (too_long, identical_pair after truncation, too_short) -> split -> max_samples
Duplicates are searched over training and held-out rows together, before the split (the held-out file's rows after
the training sources' when `eval_path` is given), so no held-out row has an exact or near twin in training.
The reference-model filter needs a model and runs when the stage starts (prefopt.data.reference).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PREFERENCE_TYPES, UNPAIRED_TYPES, SourceSection, looks_local, resolve_path
from ..errors import DataError
from ..runs.folder import sha256_of
from . import quality
from .formats import normalise_rows, split_pair, to_conversational
from .sources import check_hash, read_rows, read_text
from .tokens import token_checks

REASONS = ("empty", "invalid", "identical_pair", "conflicting_label", "too_long", "too_short", "exact_duplicate",
           "near_duplicate", "contaminated", "low_reference_score")
MIN_REVIEW = 20
EXAMPLES = 3


@dataclass
class StageData:
    train: object  # datasets.Dataset
    eval: object | None
    fmt: str
    files: list[str]
    report: dict = field(default_factory=dict)
    review: list = field(default_factory=list)  # rows for a person to read: {"source", "row", **row}
    dropped: list = field(default_factory=list)  # every dropped row: {"source", "row", "reason", "why"}
    fingerprint: str = ""  # of the rows the stage trains and evaluates on
    train_origin: list = field(default_factory=list)  # (source, 1-based row) of each training row


@dataclass
class _Rows:
    rows: list = field(default_factory=list)
    origin: list = field(default_factory=list)  # (label, 1-based row)
    is_eval: list = field(default_factory=list)
    dropped: dict = field(default_factory=dict)  # index -> reason
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    log: list = field(default_factory=list)  # {"source", "row", "reason", "why"} of every dropped row

    def drop(self, i: int, reason: str, why: str) -> None:
        self.dropped[i] = reason
        self.counts[reason] += 1
        self.log.append({"source": self.origin[i][0], "row": self.origin[i][1], "reason": reason, "why": why})
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES:
            label, row = self.origin[i]
            ex.append({"source": label, "row": row, "why": why, "text": _preview(self.rows[i])})

    def alive(self) -> list[int]:
        return [i for i in range(len(self.rows)) if i not in self.dropped]


def _preview(row: dict, n: int = 300) -> str:
    text = " | ".join(quality.fields(row))
    return text if len(text) <= n else text[:n] + "..."


def _read_source(src, kind: str, seed: int, base_dir, key: str, part: _Rows, is_eval: bool) -> dict:
    rows, label = read_rows(src.path, split=src.split, base_dir=base_dir)
    check_hash(label, src.sha256, key)
    n = normalise_rows(rows, label, kind)
    part.log += [{"source": label, "row": row, "reason": reason, "why": why} for row, reason, why in n.dropped_rows]
    for reason, c in n.dropped.items():
        part.counts[reason] += c
        for e in n.examples[reason]:
            if len(part.examples.setdefault(reason, [])) < EXAMPLES:
                part.examples[reason].append(e)
    take = list(range(len(n.rows)))
    want = None
    if getattr(src, "fraction", None) is not None:
        want = round(len(take) * src.fraction)
    elif getattr(src, "rows", None) is not None:
        want = min(src.rows, len(take))
    if want is not None and want == 0 and take:
        want = 1  # a fraction that rounds to nothing still takes a row, rather than silently none
    if want is not None and want < len(take):
        take = sorted(random.Random(f"{seed}:{label}").sample(take, want))
    for j in take:
        part.rows.append(n.rows[j])
        part.origin.append((label, n.origins[j]))
        part.is_eval.append(is_eval)
    return {"path": label, "sha256": sha256_of(label), "format": n.fmt, "rows_read": len(rows),
            "rows_usable": len(n.rows), "rows_taken": len(take), **({"fraction": src.fraction}
            if getattr(src, "fraction", None) is not None else {}), **({"rows": src.rows}
            if getattr(src, "rows", None) is not None else {})}


def decontamination_index(paths, base_dir=None) -> tuple[quality.NgramIndex, list[dict]]:
    """The evaluation items of files, folders (CSV without header as MMLU's, JSONL, JSON, Parquet) or hub ids."""
    import csv

    index = quality.NgramIndex()
    described = []
    for p in paths:
        files = []
        if looks_local(p):
            rp = resolve_path(p, base_dir)
            if rp is None:
                raise DataError(f"evaluation set not found: {p}", key="quality.decontaminate")
            files = sorted(f for f in rp.rglob("*") if f.is_file() and f.suffix.lower() in
                           (".csv", ".jsonl", ".json", ".parquet")) if rp.is_dir() else [rp]
            before = index.items
            for f in files:
                if f.suffix.lower() == ".csv":
                    import io

                    for rec in csv.reader(io.StringIO(read_text(f), newline="")):
                        index.add(" ".join(rec))
                else:
                    rows, _ = read_rows(str(f))
                    for r in rows:
                        index.add(" ".join(_strings(r)))
            described.append({"path": str(rp), "files": len(files), "items": index.items - before})
            if index.items == before:
                raise DataError(f"evaluation set {p} holds no item of {quality.MIN_ITEM_WORDS} words or more "
                                "(.csv without header, .jsonl, .json, .parquet); nothing to decontaminate against",
                                key="quality.decontaminate")
        else:
            before = index.items
            rows, label = read_rows(p, split="test")
            for r in rows:
                index.add(" ".join(_strings(r)))
            described.append({"path": label, "items": index.items - before})
    return index, described


def _strings(v) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for x in v.values() for s in _strings(x)]
    if isinstance(v, list):
        return [s for x in v for s in _strings(x)]
    return []


def _token_checks(part: _Rows, kind: str, tokenizer, max_length: int | None, min_tokens: int, loss_on: str,
                  seed: int) -> dict:
    """too_long, identical_pair after truncation, too_short; returns token-length statistics."""

    idx = part.alive()
    drops, stats = token_checks([part.rows[i] for i in idx], kind, tokenizer, max_length, min_tokens, loss_on, seed)
    for k, reason, why in drops:
        part.drop(idx[k], reason, why)
    return stats


def fingerprint(*datasets) -> str:
    h = hashlib.sha256()
    for ds in datasets:
        h.update(b"\x00")
        if ds is not None:
            for r in ds.to_list() if hasattr(ds, "to_list") else ds:
                h.update(json.dumps(r, sort_keys=True).encode())
                h.update(b"\n")
    return h.hexdigest()[:16]


def prepare_stage(stage, *, seed: int, base_dir: Path | None = None, tokenizer=None, max_length: int | None = None,
                  extra_decontaminate=()) -> StageData:
    """One stage's data step (everything but the reference-model filter). Without a tokenizer the token checks are
    left out (the report says so)."""
    from datasets import Dataset

    d, q = stage.data, stage.data.quality
    kind = stage_kind(stage)
    part = _Rows()
    sources, eval_source = _read_sources(d, kind, seed, base_dir, part)
    form = _row_form(part, kind)
    contamination = _quality_filters(part, q, kind, seed, base_dir, extra_decontaminate)
    tokens = {}
    if tokenizer is not None:
        tokens = _token_checks(part, kind, tokenizer, max_length, q.min_tokens, stage.train.loss_on, seed)
    alive = part.alive()
    if not any(not part.is_eval[i] for i in alive):
        raise _nothing_left(part, stage, max_length)
    rows = [dict(part.rows[i]) for i in alive]
    origin = [part.origin[i] for i in alive]
    train_idx, eval_idx, over_max = _split(d, alive, part, seed)
    train_rows, train_origin = [rows[k] for k in train_idx], [origin[k] for k in train_idx]
    eval_rows = [rows[k] for k in eval_idx]
    unpaired = None
    if kind == "unpaired":
        (train_rows, train_origin), (eval_rows, _), unpaired = _unpair(train_rows, train_origin, eval_rows, seed)
        _check_labels(unpaired, stage)
    train = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    n_review = min(len(train_rows), max(MIN_REVIEW, round(len(train_rows) * q.review_fraction))) \
        if q.review_fraction > 0 else 0
    pick = sorted(random.Random(f"{seed}:review").sample(range(len(train_rows)), n_review))
    review = [{"source": train_origin[k][0], "row": train_origin[k][1], **train_rows[k]} for k in pick]

    files = [s["path"] for s in sources] + ([eval_source["path"]] if eval_source else [])
    input_rows = sum(s["rows_read"] for s in sources) + (eval_source["rows_read"] if eval_source else 0)
    report = {
        "stage": stage.name,
        "type": stage.type,
        "form": form,
        "sources": sources,
        "eval_source": eval_source,
        "input_rows": input_rows,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        **({"labels": unpaired} if unpaired is not None else {}),
        "dropped": {r: part.counts.get(r, 0) for r in REASONS},
        # rows left out on purpose, not for a defect: a mixture's sampling, and training rows past max_samples
        "not_sampled": sum(s["rows_usable"] - s["rows_taken"] for s in sources),
        "over_max_samples": over_max,
        "examples": part.examples,
        "token_checks": tokenizer is not None,
        "tokens": tokens,
        "decontaminated_against": contamination,
        "quality": q.model_dump(mode="json"),
        "review_rows": len(review),
        "files": {"review": "review_sample.jsonl", "review_md": "review_sample.md", "dropped": "data_dropped.jsonl"},
        "reference_filter": None,
    }
    data = StageData(train=train, eval=eval_ds, fmt=form, files=files, report=report, review=review, dropped=part.log,
                     train_origin=train_origin)
    data.fingerprint = fingerprint(train_rows, eval_rows)
    return data


def stage_kind(stage) -> str:
    """The rows a stage trains on: preference (pairs), unpaired (KTO: single labelled answers), or sft."""
    return "preference" if stage.type in PREFERENCE_TYPES else "unpaired" if stage.type in UNPAIRED_TYPES else "sft"


def _unpair(train_rows: list, train_origin: list, eval_rows: list, seed: int):
    """A KTO stage's rows: every pair split into a desirable and an undesirable row (after the filters and the split,
    so both halves of a pair land on the same side, and a pair's two answers never count as near twins), then
    shuffled (seeded): KTOTrainer builds each row's KL completion from its neighbour in file order (and reads the
    rows in that order under transformers < 5.2), so a split pair's halves must not sit side by side. Returns the
    rows, their origins, and the label counts for the report."""
    out, counts = [], {}
    for name, rows, origin in (("train", train_rows, train_origin), ("eval", eval_rows, [None] * len(eval_rows))):
        flat, where, pairs = [], [], 0
        for r, o in zip(rows, origin):
            halves = split_pair(r) if "chosen" in r else [r]
            pairs += len(halves) == 2
            flat += halves
            where += [o] * len(halves)
        order = list(range(len(flat)))
        random.Random(f"{seed}:kto:{name}").shuffle(order)
        flat, where = [flat[k] for k in order], [where[k] for k in order]
        good = sum(r["label"] for r in flat)
        counts[name] = {"desirable": good, "undesirable": len(flat) - good, "pairs_split": pairs}
        out.append((flat, where))
    return out[0], out[1], counts


def _check_labels(counts: dict, stage) -> None:
    """A KTO stage learns from the contrast: training rows of both labels, or nothing to learn."""
    c = counts["train"]
    if not c["desirable"] or not c["undesirable"]:
        missing = "desirable (label: true)" if not c["desirable"] else "undesirable (label: false)"
        raise DataError(f"a {stage.type} stage needs training rows of both labels; after the data step there are "
                        f"{c['desirable']} desirable and {c['undesirable']} undesirable, so no {missing} row: add "
                        "some (or a paired file, whose pairs give one of each)")


def _read_sources(d, kind: str, seed: int, base_dir: Path | None, part: _Rows) -> tuple[list[dict], dict | None]:
    """Every source's rows into `part` (the eval_path file's marked as held out); each source's report entry."""
    sources = []
    multi = not isinstance(d.path, str)
    for j, src in enumerate(d.sources()):
        try:
            sources.append(_read_source(src, kind, seed, base_dir, f"path[{j}].sha256" if multi else "sha256", part,
                                        False))
        except DataError as e:
            raise DataError(str(e), key=e.key or (f"path[{j}]" if multi else None)) from None
    eval_source = None
    if d.eval_path:
        eval_source = _read_source(SourceSection(path=d.eval_path, sha256=d.eval_sha256, split=d.split), kind, seed,
                                   base_dir, "eval_sha256", part, True)
    return sources, eval_source


def _row_form(part: _Rows, kind: str) -> str:
    """The rows' one form (TRL's): conversational or standard preference pairs (or unpaired rows); text or messages
    for SFT."""
    if kind in ("preference", "unpaired") and any(isinstance(r["prompt"], list) for r in part.rows):
        part.rows = [to_conversational(r) for r in part.rows]
        return "conversational"
    if kind in ("preference", "unpaired"):
        return "standard"
    forms = {"text" if "text" in r else "messages" for r in part.rows}
    if len(forms) > 1:
        raise DataError("the sources mix plain `text` rows with chat rows; train them in separate stages")
    return forms.pop() if forms else "messages"


def _quality_filters(part: _Rows, q, kind: str, seed: int, base_dir: Path | None, extra_decontaminate) -> list:
    """Identical pairs, exact and near duplicates, contamination with evaluation sets: dropped from `part`. Returns
    what the rows were decontaminated against."""
    wds = [quality.row_words(r) for r in part.rows] if q.dedup == "near" or q.decontaminate or extra_decontaminate \
        else None
    if kind in ("preference", "unpaired"):
        for i in quality.identical_pairs(part.rows):
            part.drop(i, "identical_pair", "chosen and rejected are the same text")
    groups = [set(range(len(part.rows)))]
    if kind == "unpaired":  # KTO: a desirable and an undesirable answer that are near twins are a contrast, kept
        _conflicting_labels(part)
        by = {}
        for i, r in enumerate(part.rows):
            by.setdefault("pair" if "chosen" in r else bool(r["label"]), set()).add(i)
        groups = list(by.values())
    everyone = set(range(len(part.rows)))
    for members in groups:
        others = everyone - members
        if q.dedup in ("exact", "near"):
            for i in quality.exact_duplicates(part.rows, set(part.dropped) | others):
                part.drop(i, "exact_duplicate", "repeats an earlier row")
        if q.dedup == "near":
            for i, twin in quality.near_duplicates(part.rows, set(part.dropped) | others, q.near_threshold, seed=1,
                                                    row_words_of=wds):
                label, row = part.origin[twin]
                part.drop(i, "near_duplicate", f"nearly repeats {label} row {row}")
    contamination = []
    decon = list(q.decontaminate) + [p for p in extra_decontaminate if p not in q.decontaminate]
    if decon:
        index, contamination = decontamination_index(decon, base_dir)
        for i, gram in quality.contaminated(part.rows, set(part.dropped), index, row_words_of=wds):
            part.drop(i, "contaminated", f"shares '{gram}' with an evaluation item")
    return contamination


def _conflicting_labels(part: _Rows) -> None:
    """KTO rows whose prompt and answer are the same text but labelled both ways (conflicting votes): every such
    row is dropped, since no one label is right, rather than keeping whichever came first."""
    seen: dict[str, list[int]] = {}
    for i, r in enumerate(part.rows):
        if "completion" in r and i not in part.dropped:
            seen.setdefault("\x1f".join(quality.norm(t) for t in quality.fields(r)), []).append(i)
    for rows in seen.values():
        if len({bool(part.rows[i]["label"]) for i in rows}) == 2:
            where = "rows " + ", ".join(str(part.origin[i][1]) for i in rows[:4]) + ("..." if len(rows) > 4 else "")
            for i in rows:
                part.drop(i, "conflicting_label", f"the same prompt and answer are labelled both ways ({where})")


def _nothing_left(part: _Rows, stage, max_length: int | None) -> DataError:
    """Every training row was dropped: why, and the knob to turn."""
    reasons = ", ".join(f"{c} {r}" for r, c in part.counts.most_common())
    if part.counts.get("too_long"):  # the knob is the stage's max_length, not the data
        key = "stage:trainer_kwargs.max_length" if "max_length" in stage.trainer_kwargs else "stage:train.max_length"
        return DataError(f"every training row was dropped ({reasons}): each prompt fills max_length {max_length} "
                         f"tokens or more (e.g. {part.examples['too_long'][0]['why']}), so none would train; raise "
                         "max_length or shorten the prompts", key=key)
    return DataError(f"every training row was dropped ({reasons or 'no rows'}); see the examples with "
                     "`prefopt data RECIPE`, fix the data or relax data.quality")


def _split(d, alive: list[int], part: _Rows, seed: int) -> tuple[list[int], list[int], int]:
    """Train and held-out indexes into the surviving rows (the seeded split, unless eval_path gave the held-out
    rows), and how many training rows max_samples left out."""
    train_idx = [k for k, i in enumerate(alive) if not part.is_eval[i]]
    eval_idx = [k for k, i in enumerate(alive) if part.is_eval[i]]
    if not d.eval_path and d.eval_fraction > 0 and len(train_idx) >= 2:
        n_eval = max(1, round(len(train_idx) * d.eval_fraction))
        if n_eval >= len(train_idx):
            raise DataError(f"eval_fraction {d.eval_fraction:g} of {len(train_idx)} rows holds out {n_eval} and leaves "
                            "no training row; lower it", key="eval_fraction")
        order = list(train_idx)
        random.Random(seed).shuffle(order)
        eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    over_max = 0
    if d.max_samples and len(train_idx) > d.max_samples:
        over_max = len(train_idx) - d.max_samples
        train_idx = train_idx[: d.max_samples]
    return train_idx, eval_idx, over_max
