"""MMLU through lm-evaluation-harness: base and tuned on the same items, in one process, per-item results.

Two sources, one task shape (lm-eval's own MMLU prompt: the question, A-D, "Answer:", choices scored by
log-likelihood):
- a hub id (`cais/mmlu`): lm-eval's MMLU subjects, read through `datasets` (cached copies work offline);
- a local folder in the original Hendrycks layout: `dev/<subject>_dev.csv` (few-shot examples) and
  `test/<subject>_test.csv`, no header, columns question, A, B, C, D, answer letter.

The model is the live PeftModel (`HFLM(pretrained=model)`), so the 4-bit base is loaded once: the base is
scored with the adapter disabled, the tuned model with it enabled.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from .. import _compat

COLUMNS = ("question", "A", "B", "C", "D", "answer")
TASK_PREFIX = "prefopt_mmlu_"
PROMPT = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
HUB_PROMPT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"


def is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


# ---------------------------------------------------------------------------------------------- the local folder


def local_subjects(folder: Path) -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (Path(folder) / "test").glob("*_test.csv"))


def check_local_folder(folder: Path, num_fewshot: int) -> list[str]:
    """What is wrong with a Hendrycks-layout folder (each problem names its file and line); [] when usable."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"folder not found: {folder}"]
    subjects = local_subjects(folder)
    if not subjects:
        return [f"{folder}: no test/<subject>_test.csv files (expected the Hendrycks MMLU layout: "
                "dev/<subject>_dev.csv, "
                "test/<subject>_test.csv, no header: question, A, B, C, D, answer)"]
    problems = []
    for s in subjects:
        files = [folder / "test" / f"{s}_test.csv"]
        dev = folder / "dev" / f"{s}_dev.csv"
        if num_fewshot > 0:
            if not dev.is_file():
                problems.append(f"{dev}: missing (num_fewshot {num_fewshot} takes its examples from the dev split; "
                                "add the file or set num_fewshot: 0)")
            else:
                files.append(dev)
        for f in files:
            rows = _rows(f, problems)
            if rows is not None and f.parent.name == "dev" and len(rows) < num_fewshot:
                problems.append(f"{f}: {len(rows)} examples, fewer than num_fewshot {num_fewshot}")
            if rows is not None and f.parent.name == "test" and not rows:
                problems.append(f"{f}: no questions")
    return problems


def _rows(path: Path, problems: list[str]) -> list[list[str]] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return None
    rows = []
    for i, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row:
            continue
        if len(row) != 6:
            problems.append(f"{path} line {i}: {len(row)} columns, expected 6 (question, A, B, C, D, answer; "
                            "no header)")
            return None
        if row[5].strip() not in ("A", "B", "C", "D"):
            problems.append(f"{path} line {i}: answer {row[5]!r} is not A, B, C or D")
            return None
        rows.append(row)
    return rows


def count_rows(path: Path) -> int:
    return sum(1 for row in csv.reader(Path(path).read_text(encoding="utf-8").splitlines()) if row)


def files_used(path: str, num_fewshot: int) -> list[Path]:
    """The local CSV files an evaluation reads (test always, dev when there are few-shot examples)."""
    if not is_local(path):
        return []
    folder = Path(path).expanduser()
    out = []
    for s in local_subjects(folder):
        out.append(folder / "test" / f"{s}_test.csv")
        if num_fewshot > 0:
            out.append(folder / "dev" / f"{s}_dev.csv")
    return out


def data_fingerprint(path: str, num_fewshot: int, limit: int | None) -> str:
    """What determines the items and prompts: every local file's content (or the hub id and its cached revision),
    the few-shot count and the limit."""
    h = hashlib.sha256(json.dumps([num_fewshot, limit, _lm_eval_version()]).encode())
    if is_local(path):
        for f in files_used(path, num_fewshot):
            h.update(f"{f.parent.name}/{f.name}:".encode())
            h.update(f.read_bytes())
    else:
        h.update(f"hub:{path}:{_hub_revision(path)}".encode())
    return h.hexdigest()[:16]


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _hub_revision(repo: str) -> str | None:
    try:
        from huggingface_hub import scan_cache_dir

        for r in scan_cache_dir().repos:
            if r.repo_id == repo and r.repo_type == "dataset":
                return sorted(rev.commit_hash for rev in r.revisions)[-1]
    except Exception:  # no cache yet
        return None
    return None


def hub_cached(repo: str) -> bool:
    return _hub_revision(repo) is not None


def hub_subjects() -> list[str]:
    """lm-eval's MMLU subjects (its own task files name them)."""
    return sorted(p.stem.removeprefix("mmlu_") for p in _compat.lm_eval_mmlu_task_files())


# ---------------------------------------------------------------------------------------------- tasks and runs


def build_tasks(path: str, num_fewshot: int) -> list:
    """One lm-eval task per subject, defined in code (no task registry, no include_path)."""
    from datasets import Features, Value
    from lm_eval.api.task import ConfigurableTask

    common = {
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "doc_to_choice": ["A", "B", "C", "D"],
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": num_fewshot,
        "metadata": {"version": 1.0},
    }
    tasks = []
    if is_local(path):
        folder = Path(path).expanduser().resolve()
        features = Features({c: Value("string") for c in COLUMNS})
        for s in local_subjects(folder):
            files = {"test": str(folder / "test" / f"{s}_test.csv")}
            if (folder / "dev" / f"{s}_dev.csv").is_file():
                files["dev"] = str(folder / "dev" / f"{s}_dev.csv")
            cfg = dict(common, task=TASK_PREFIX + s, dataset_path="csv",
                       dataset_kwargs={"data_files": files, "column_names": list(COLUMNS), "features": features,
                                       "keep_default_na": False},
                       doc_to_text=PROMPT, doc_to_target="{{['A', 'B', 'C', 'D'].index(answer.strip())}}",
                       description=f"The following are multiple choice questions (with answers) about "
                                   f"{s.replace('_', ' ')}.\n\n")
            if "dev" not in files:
                cfg.pop("fewshot_split")
            tasks.append(ConfigurableTask(config=cfg))
    else:
        for s in hub_subjects():
            tasks.append(ConfigurableTask(config=dict(
                common, task=TASK_PREFIX + s, dataset_path=path, dataset_name=s, doc_to_text=HUB_PROMPT,
                doc_to_target="answer",
                description="The following are multiple choice questions (with answers) about "
                            f"{s.replace('_', ' ')}.\n\n")))
    return tasks


def score(model, tokenizer, *, path: str, num_fewshot: int, limit: int | None, batch_size: int,
          seed: int) -> list[dict]:
    """Per-item results of one model: [{subject, id, correct, doc_hash, loglik}] in a fixed order."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # the tasks are built here, so lm-eval need not index its thousands of task files (seconds per call)
    out = simple_evaluate(model=lm, tasks=build_tasks(path, num_fewshot), num_fewshot=num_fewshot, limit=limit,
                          task_manager=TaskManager(include_defaults=False), log_samples=True, bootstrap_iters=0,
                          random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    items = []
    for task, samples in sorted(out["samples"].items()):
        subject = task.removeprefix(TASK_PREFIX)
        for smp in sorted(samples, key=lambda x: int(x["doc_id"])):
            items.append({"subject": subject, "id": int(smp["doc_id"]), "correct": bool(float(smp["acc"]) > 0.5),
                          "doc_hash": smp.get("doc_hash"),
                          "loglik": [float(r[0]) for r in smp["filtered_resps"]]})  # per choice A-D
    return items


def summary(items: list[dict]) -> dict:
    n = len(items)
    acc = sum(i["correct"] for i in items) / n if n else float("nan")
    per_subject: dict[str, list] = {}
    for i in items:
        per_subject.setdefault(i["subject"], []).append(i["correct"])
    return {"acc": acc, "n": n,
            "per_subject": {s: {"acc": sum(v) / len(v), "n": len(v)} for s, v in per_subject.items()}}


def paired(base: list[dict], tuned: list[dict]) -> dict:
    """Delta in points and its paired standard error: the per-item differences d = tuned - base (each -1, 0 or
    1), se = sd(d) / sqrt(n) * 100. Pairing removes the items' shared difficulty from the error."""
    key = lambda i: (i["subject"], i["id"])  # noqa: E731
    b = {key(i): i for i in base}
    rows = []
    for t in tuned:
        bi = b.get(key(t))
        if bi is None or (bi.get("doc_hash") and t.get("doc_hash") and bi["doc_hash"] != t["doc_hash"]):
            raise RuntimeError(f"MMLU item {key(t)} differs between the base and tuned evaluations")
        rows.append({"subject": t["subject"], "id": t["id"], "base_correct": bi["correct"],
                     "tuned_correct": t["correct"]})
    if len(rows) != len(base):
        raise RuntimeError(f"MMLU: {len(base)} base items but {len(rows)} tuned ones")
    n = len(rows)
    d = [int(r["tuned_correct"]) - int(r["base_correct"]) for r in rows]
    mean = sum(d) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return {"items": rows, "delta_points": 100.0 * mean, "paired_stderr": 100.0 * math.sqrt(var / n) if n else None}
