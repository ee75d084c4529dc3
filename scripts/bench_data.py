"""The data step's speed on a large preference file with planted defects (no reference filter).

    python scripts/bench_data.py --rows 100000 [--tokenizer demo/tiny-llama]

Writes the file (scripts/planted_data.py: clean rows of ~80 random words, 2% of each defect kind), runs the data
step exactly as `prefopt run` does (every default filter on: near-duplicate search, decontamination against the
planted evaluation set, token checks at max_length 512), and reports the wall time and the recall per defect kind
(so the time is known to be spent finding them, not skipping them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planted_data import KINDS, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--tokenizer", default="demo/tiny-llama")
    ap.add_argument("--max-length", type=int, default=512)
    a = ap.parse_args()

    from prefopt import recipe_from_dict
    from prefopt.data import prepare_stage
    from prefopt.data.quality import engine
    from prefopt.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        n_each = a.rows // 50
        path, eval_set, labels = write(Path(tmp) / "prefs.jsonl", a.rows - n_each * len(KINDS), n_each)
        raw = {"name": "bench", "model": {"name_or_path": a.tokenizer},
               "stages": [{"name": "dpo", "type": "dpo", "data": {
                   "path": str(path), "eval_fraction": 0.1, "quality": {"decontaminate": [str(eval_set)]}}}]}
        stage = recipe_from_dict(raw).stages[0]
        tok = load_tokenizer(a.tokenizer)
        t0, c0 = time.perf_counter(), time.process_time()
        data = prepare_stage(stage, seed=0, tokenizer=tok, max_length=a.max_length)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    found = {d["row"]: d["reason"] for d in data.dropped}
    print(f"rows: {len(labels)} ({n_each} of each defect kind), data step wall time {wall:.1f} s "
          f"({len(labels) / wall:,.0f} rows/s), CPU time {cpu:.1f} s (this process, all threads; near-duplicate "
          f"engine: {engine()})")
    for kind in KINDS:
        rows = [i + 1 for i, lab in enumerate(labels) if lab == kind]
        hit = sum(found.get(r) == kind for r in rows)
        print(f"  {kind:16s} recall {hit / len(rows):.3f} ({hit}/{len(rows)})")
    clean = [i + 1 for i, lab in enumerate(labels) if lab is None]
    lost = Counter(found[r] for r in clean if r in found)
    print(f"  clean rows kept {1 - sum(lost.values()) / len(clean):.4f} (dropped: {dict(lost) or 'none'})")
    print(f"  report: {data.report['train_rows']} train, {data.report['eval_rows']} eval, dropped "
          f"{ {k: v for k, v in data.report['dropped'].items() if v} }")


if __name__ == "__main__":
    main()
