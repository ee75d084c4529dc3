"""A preference file with planted defects, for the data-quality tests and benchmark.

Clean rows are random word sequences (prompt ~20 words, answers ~30 each: ~80 words a row), so no two clean rows are
near duplicates by chance. Each planted row is derived from a clean row and labelled with the reason the data step
must give it. `python scripts/planted_data.py OUT.jsonl --rows 100000` writes one (and OUT.eval.jsonl, the
evaluation set the contaminated rows quote).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

KINDS = ("exact_duplicate", "near_duplicate", "identical_pair", "empty", "too_long", "contaminated")


def _vocab(rng: random.Random, n: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(n)})


def planted(n_clean: int, n_each: int, seed: int = 0, long_words: int = 400):
    """(rows, labels, eval_items): labels[i] is None for a clean row, else the reason it must be dropped for."""
    rng = random.Random(seed)
    vocab = _vocab(rng)

    def sent(k):
        return " ".join(rng.choice(vocab) for _ in range(k)) + "."

    clean = [{"prompt": sent(20), "chosen": sent(30), "rejected": sent(30)} for _ in range(n_clean)]
    eval_items = [sent(20) for _ in range(n_each)]
    rows = [(r, None) for r in clean]
    src = rng.sample(range(n_clean), n_each * 3)
    for j in range(n_each):
        a, b, c = clean[src[j]], clean[src[n_each + j]], clean[src[2 * n_each + j]]
        # an exact duplicate up to whitespace and case
        rows.append(({"prompt": "  " + a["prompt"].upper(), "chosen": a["chosen"], "rejected": a["rejected"] + " "},
                     "exact_duplicate"))
        words = b["chosen"].split()  # one word of ~80 changed
        words[rng.randrange(len(words))] = rng.choice(vocab)
        rows.append(({**b, "chosen": " ".join(words)}, "near_duplicate"))
        rows.append(({"prompt": sent(20), "chosen": (x := sent(30)), "rejected": "  " + x}, "identical_pair"))
        rows.append(({"prompt": sent(20), "chosen": rng.choice(["", "   ", "\n"]), "rejected": sent(30)}, "empty"))
        rows.append(({"prompt": sent(long_words), "chosen": sent(30), "rejected": sent(30)}, "too_long"))
        rows.append(({"prompt": sent(8) + " " + eval_items[j] + " " + sent(4), "chosen": sent(30),
                      "rejected": sent(30)}, "contaminated"))
        del c
    order = list(range(len(rows)))
    rng.shuffle(order)
    # a planted duplicate must come after its original to be the one dropped: keep clean rows first in file order
    clean_first = [k for k in order if rows[k][1] is None] + [k for k in order if rows[k][1] is not None]
    rows = [rows[k] for k in clean_first]
    return [r for r, _ in rows], [lab for _, lab in rows], eval_items


def write(out: Path, n_clean: int, n_each: int, seed: int = 0) -> tuple[Path, Path, list]:
    rows, labels, items = planted(n_clean, n_each, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = out.with_suffix(".eval.jsonl")
    ev.write_text("".join(json.dumps({"question": q}) + "\n" for q in items))
    return out, ev, labels


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--planted", type=float, default=0.02, help="fraction of each defect kind")
    a = ap.parse_args()
    n_each = int(a.rows * a.planted)
    write(a.out, a.rows - n_each * len(KINDS), n_each)
