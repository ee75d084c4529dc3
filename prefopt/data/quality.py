"""Text-level filters over canonical rows: identical pairs, exact and near duplicates (MinHash LSH through
datasketch), and decontamination against evaluation sets (shared 13-word n-grams).

Each filter takes the rows in order and returns the indexes it drops; the first of every cluster is kept, so the
result depends only on the row order (which the seeded mixture fixes).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

NUM_PERM = 128
SHINGLE = 3  # words per shingle: one changed word in ~80 leaves Jaccard ~0.93, well above the 0.85 default
NGRAM = 13  # decontamination n-gram (words), as GPT-3's and most later contamination studies
MIN_ITEM_WORDS = 8  # evaluation items shorter than 13 words match as a whole, from this many words up
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def fields(row: dict, skip_system: bool = False) -> list[str]:
    """The texts of a canonical row, in order: prompt and answers, or every message, or the text."""
    out = []
    for k in ("prompt", "chosen", "rejected", "completion", "messages", "text"):
        v = row.get(k)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.extend(f"{m['role']}: {m['content']}" for m in v if not (skip_system and m["role"] == "system"))
    return out


def norm(text: str) -> str:
    """Unicode-folded, case-folded, whitespace-collapsed text."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def answer_text(ans) -> str:
    return ans if isinstance(ans, str) else "\n".join(f"{m['role']}: {m['content']}" for m in ans)


def identical_pairs(rows: list[dict]) -> list[int]:
    """Preference rows whose answers are the same text once whitespace and case are normalised."""
    return [i for i, r in enumerate(rows)
            if "chosen" in r and norm(answer_text(r["chosen"])) == norm(answer_text(r["rejected"]))]


def exact_duplicates(rows: list[dict], skip: set[int]) -> list[int]:
    seen: set[bytes] = set()
    out = []
    for i, r in enumerate(rows):
        if i in skip:
            continue
        key = hashlib.blake2b("\x1f".join(norm(t) for t in fields(r)).encode(), digest_size=16).digest()
        if key in seen:
            out.append(i)
        else:
            seen.add(key)
    return out


def row_words(row: dict) -> list[str]:
    """The words near-duplicate search and decontamination look at: every field but system turns, which
    datasets share across rows (a long shared system prompt would make every row a near twin of every other)."""
    return words(" ".join(fields(row, skip_system=True)))


def shingles(w: list[str]) -> set[str]:
    if len(w) < SHINGLE:
        return {" ".join(w)} if w else set()
    return {" ".join(w[j:j + SHINGLE]) for j in range(len(w) - SHINGLE + 1)}


BANDS = 16  # LSH bands of 8 rows each: a pair at Jaccard 0.85 becomes a candidate with probability 0.994, one at 0.5
# with 0.06; every candidate is then confirmed by its estimated similarity


def engine() -> str:
    """rensa (Rust, ~50x faster) when installed, else datasketch; both are MinHash + LSH with the same banding.
    PREFOPT_NEAR_ENGINE=datasketch forces the pure-Python one (the benchmark's second configuration)."""
    import os

    if os.environ.get("PREFOPT_NEAR_ENGINE") in ("rensa", "datasketch"):
        return os.environ["PREFOPT_NEAR_ENGINE"]
    try:
        import rensa  # noqa: F401

        return "rensa"
    except ImportError:
        return "datasketch"


def near_duplicates(rows: list[dict], skip: set[int], threshold: float, seed: int = 1,
                    engine_name: str | None = None, row_words_of=None) -> list[tuple[int, int]]:
    """(dropped row, the earlier row it nearly repeats) for rows whose estimated Jaccard similarity of word
    shingles with an earlier kept row reaches `threshold`."""
    idx = [i for i in range(len(rows)) if i not in skip]
    sets = [shingles(row_words_of[i] if row_words_of else row_words(rows[i])) for i in idx]
    if (engine_name or engine()) == "rensa":
        from rensa import RMinHash, RMinHashLSH

        hashes = RMinHash.from_token_sets([list(x) for x in sets], num_perm=NUM_PERM, seed=seed)
        lsh = RMinHashLSH(threshold=threshold, num_perm=NUM_PERM, num_bands=BANDS)
    else:
        from datasketch import MinHash, MinHashLSH

        hashes = MinHash.generator([[t.encode() for t in x] for x in sets], num_perm=NUM_PERM, seed=seed)
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=(BANDS, NUM_PERM // BANDS))
    out = []
    kept: dict[int, object] = {}
    for i, m in zip(idx, hashes):
        twin = next((j for j in sorted(lsh.query(m)) if kept[j].jaccard(m) >= threshold), None)
        if twin is not None:
            out.append((i, twin))
            continue
        kept[i] = m
        lsh.insert(i, m)
    return out


class NgramIndex:
    """The word n-grams of evaluation items: 13-grams, and whole items of 8-12 words."""

    def __init__(self):
        self.grams: dict[int, set[str]] = {}
        self.items = 0

    def add(self, text: str) -> None:
        w = words(text)
        if len(w) < MIN_ITEM_WORDS:
            return
        self.items += 1
        n = min(NGRAM, len(w))
        self.grams.setdefault(n, set()).update(" ".join(w[j:j + n]) for j in range(len(w) - n + 1))

    def hit(self, w: list[str]) -> str | None:
        """The first evaluation n-gram the words contain, or None."""
        for n, grams in self.grams.items():
            for j in range(len(w) - n + 1):
                g = " ".join(w[j:j + n])
                if g in grams:
                    return g
        return None


def contaminated(rows: list[dict], skip: set[int], index: NgramIndex, row_words_of=None) -> list[tuple[int, str]]:
    """(row, the shared n-gram) for rows sharing an n-gram with an evaluation item."""
    if not index.grams:
        return []
    out = []
    for i, r in enumerate(rows):
        if i in skip:
            continue
        g = index.hit(row_words_of[i] if row_words_of else row_words(r))
        if g is not None:
            out.append((i, g))
    return out
