"""The reference-model quality filter (opt-in): score each training row with the stage's reference model and drop
the lowest-scoring fraction.

- preference rows: the length-normalised log-prob margin of chosen over rejected, mean log p(chosen token) - mean
  log p(rejected token), under the reference (the previous stage's adapter; the base with no stage before, or with
  `reference: base`). A pair the reference already finds backwards or indistinguishable scores lowest.
- SFT rows: the mean per-token log-prob of the trained (assistant) tokens under the base (adapter disabled).
It runs when the stage starts, on the model the stage has just loaded, so the base is not loaded twice.
Held-out rows are not filtered: the held-out figures stay comparable across filter settings.
"""

from __future__ import annotations

import contextlib
import json
import random

from ..config import PREFERENCE_TYPES
from ..models import base_view
from ..runs.folder import write_atomic
from .quality import fields
from .tokens import encode_preference, encode_sft


def _mean_logps(model, seqs: list[list[int]], masks: list[list[int]], batch_size: int, pad_id: int) -> list[float]:
    """Mean log-prob of the tokens of seqs[k] where masks[k] is 1, each given what precedes it."""
    import torch

    device = next(p.device for p in model.parameters())
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk, mk = seqs[b: b + batch_size], masks[b: b + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, s in enumerate(chunk):
            ids[k, : len(s)] = torch.tensor(s)
            att[k, : len(s)] = 1
        ids, att = ids.to(device), att.to(device)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for k, s in enumerate(chunk):
            m = torch.tensor(mk[k][1: len(s)], dtype=torch.bool, device=logp.device)  # token t scored at t-1
            vals = logp[k, : len(s) - 1][m]
            out.append(vals.mean().item() if len(vals) else float("-inf"))
    return out


def score_rows(model, tokenizer, rows: list[dict], *, preference: bool, max_length: int | None, batch_size: int,
               use_base: bool) -> list[float]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cut = (lambda s: s[:max_length]) if max_length else (lambda s: s)
    was_training = model.training
    model.eval()
    off = base_view(model) if use_base else contextlib.nullcontext()
    try:
        with torch.no_grad(), off:
            if preference:
                enc = encode_preference(rows, tokenizer)
                answer = lambda p, x: cut([0] * len(p) + [1] * (len(x) - len(p)))  # noqa: E731
                chosen = _mean_logps(model, [cut(c) for _, c, _ in enc], [answer(p, c) for p, c, _ in enc],
                                     batch_size, pad)
                rejected = _mean_logps(model, [cut(r) for _, _, r in enc], [answer(p, r) for p, _, r in enc],
                                       batch_size, pad)
                return [c - r for c, r in zip(chosen, rejected)]
            enc = encode_sft(rows, tokenizer)  # the assistant turns' tokens only
            return _mean_logps(model, [cut(e["input_ids"]) for e in enc], [cut(e["assistant_masks"]) for e in enc],
                               batch_size, pad)
    finally:
        model.train(was_training)


def apply_reference_filter(model, tokenizer, stage, data, *, use_base: bool, max_length: int | None, seed: int):
    """Drop the configured lowest fraction of data.train (in place); returns the per-row scores, for
    data_scores.jsonl."""
    from datasets import Dataset

    rf = stage.data.quality.reference_filter
    preference = stage.type in PREFERENCE_TYPES
    score = rf.score if rf.score != "auto" else ("margin" if preference else "logprob")
    rows = data.train.to_list()
    scores = score_rows(model, tokenizer, rows, preference=preference, max_length=max_length,
                        batch_size=rf.batch_size, use_base=use_base)
    n_drop = min(len(rows) - 1, round(len(rows) * rf.drop_fraction))
    order = sorted(range(len(rows)), key=lambda k: (scores[k], random.Random(f"{seed}:{k}").random()))
    drop = set(order[:n_drop])
    data.train = Dataset.from_list([r for k, r in enumerate(rows) if k not in drop])
    origin = data.train_origin or [("?", k + 1) for k in range(len(rows))]
    data.dropped += [{"source": origin[k][0], "row": origin[k][1], "reason": "low_reference_score",
                      "why": f"{score} {scores[k]:.4f}"} for k in sorted(drop)]
    data.train_origin = [o for k, o in enumerate(origin) if k not in drop]
    gone = {origin[k] for k in drop}  # the review sample holds only rows that train
    data.review = [r for r in data.review if (r["source"], r["row"]) not in gone]
    rep = data.report
    rep["review_rows"] = len(data.review)
    rep["dropped"]["low_reference_score"] = len(drop)
    rep["train_rows"] = len(data.train)

    ex = [{"source": origin[k][0], "row": origin[k][1], "why": f"{score} {scores[k]:.4f}",
           "text": " | ".join(fields(rows[k]))[:300]} for k in order[:3]] if drop else []
    rep["examples"]["low_reference_score"] = ex
    rep["reference_filter"] = {"score": score, "reference": "base" if use_base else "previous stage's adapter",
                               "drop_fraction": rf.drop_fraction, "dropped": len(drop),
                               "threshold": scores[order[n_drop - 1]] if drop else None, "scores_file": SCORES}
    return [{"source": origin[k][0], "row": origin[k][1], "score": scores[k], "kept": k not in drop}
            for k in range(len(rows))]


SCORES = "data_scores.jsonl"


def write_scores(folder, scores: list[dict]) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / SCORES, "".join(json.dumps(s) + "\n" for s in scores))
