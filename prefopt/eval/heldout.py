"""Held-out task metrics, on each stage's held-out rows (never trained on).

- SFT: held-out loss and perplexity (from the stage's own evaluation), plus answer-level exact and contains
  match, base and tuned, on rows whose reference answer is short (a long answer has no one right wording).
- Preference stages: reward accuracy and margin against the stage's reference (the stage's own evaluation),
  plus the tuned-vs-base win rate: the share of pairs where the tuned model prefers the chosen answer over the
  rejected one by a wider log-prob margin than the base does.
- KTO stages (single labelled answers): the reward margin (mean desirable - mean undesirable reward, the stage's own
  evaluation), plus the tuned-vs-base win rate: over every (desirable, undesirable) pair of held-out rows, the share
  where the tuned model raised the desirable answer's log-prob more than the undesirable one's, against the base
  (what an earlier stage did to every answer alike cancels). No reward accuracy: there are no pairs to score.
"""

from __future__ import annotations

import math

from ..models import base_view
from .completions import generate, prompt_of, reference_of

SHORT_ANSWER_CHARS = 120  # "short reference answers": a sentence, a number, a label
MAX_ROWS = 64  # generation per row is the slow part on a CPU


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).strip(" .!?")


def sft_metrics(model, tokenizer, rows: list[dict], stage_metrics: dict, *, seed: int,
                max_new_tokens: int = 64) -> dict:

    out: dict = {}
    loss = (stage_metrics.get("eval") or {}).get("eval_loss")
    if loss is not None:
        out["eval_loss"] = loss
        out["perplexity"] = math.exp(min(loss, 50.0))
    short = [r for r in rows if (reference_of(r) or "") and len(reference_of(r)) <= SHORT_ANSWER_CHARS][:MAX_ROWS]
    if not short:
        return out
    prompts, refs = [prompt_of(r) for r in short], [reference_of(r) for r in short]
    # a short answer needs few tokens: generating far past the longest reference only costs time
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
    max_new_tokens = min(max_new_tokens, longest + 8)
    with base_view(model):
        base = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    tuned = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    for name, outs in (("base", base), ("tuned", tuned)):
        out[f"exact_match_{name}"] = sum(_norm(o) == _norm(r) for o, r in zip(outs, refs)) / len(refs)
        out[f"contains_{name}"] = sum(_norm(r) in _norm(o) for o, r in zip(outs, refs)) / len(refs)
    out["answer_rows"] = len(refs)
    out["task_delta"] = out["exact_match_tuned"] - out["exact_match_base"]
    return out


def _split(tokenizer, prompt, answer) -> tuple[str, str]:
    """(prompt text, answer text) as the chat template renders them; strings are taken as they are."""
    if isinstance(prompt, list):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if full.startswith(head):
            return head, full[len(head):]
        return head, "".join(m["content"] for m in answer)
    return prompt, answer


def answer_logps(model, tokenizer, rows: list[dict], key: str, batch_size: int = 8) -> list[float]:
    """Sum of the answer tokens' log-probs given the prompt, per row."""
    import torch

    device = next(model.parameters()).device
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k: k + batch_size]
        heads, ids = [], []
        for r in chunk:
            head, ans = _split(tokenizer, r["prompt"], r[key])
            h = tokenizer(head, add_special_tokens=False)["input_ids"]
            a = tokenizer(ans, add_special_tokens=False)["input_ids"]
            heads.append(len(h))
            ids.append(h + a)
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        inp = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=inp, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, inp[:, 1:, None])[..., 0]
        for j, x in enumerate(ids):
            out.append(float(logp[j, heads[j] - 1: len(x) - 1].sum()))
    return out


def preference_metrics(model, tokenizer, rows: list[dict], stage_metrics: dict) -> dict:
    ev = stage_metrics.get("eval") or {}
    out = {k: ev[f"eval_rewards/{k}"] for k in ("accuracies", "margins") if f"eval_rewards/{k}" in ev}
    out = {("reward_accuracy" if k == "accuracies" else "reward_margin"): v for k, v in out.items()}
    rows = rows[:MAX_ROWS * 4]
    if not rows:
        return out
    model.eval()
    with base_view(model):
        base = [c - r for c, r in zip(answer_logps(model, tokenizer, rows, "chosen"),
                                      answer_logps(model, tokenizer, rows, "rejected"))]
    tuned = [c - r for c, r in zip(answer_logps(model, tokenizer, rows, "chosen"),
                                   answer_logps(model, tokenizer, rows, "rejected"))]
    n = len(rows)
    out.update({
        "pairs": n,
        "win_rate_vs_base": sum(t > b for t, b in zip(tuned, base)) / n,
        "chosen_over_rejected_base": sum(b > 0 for b in base) / n,
        "chosen_over_rejected_tuned": sum(t > 0 for t in tuned) / n,
        "logp_margin_base": sum(base) / n,
        "logp_margin_tuned": sum(tuned) / n,
    })
    out["task_delta"] = out["win_rate_vs_base"] - 0.5
    return out


def unpaired_metrics(model, tokenizer, rows: list[dict], stage_metrics: dict) -> dict:
    ev = stage_metrics.get("eval") or {}
    out = {"reward_margin": ev["eval_rewards/margins"]} if "eval_rewards/margins" in ev else {}
    rows = rows[:MAX_ROWS * 4]
    if not rows:
        return out
    model.eval()
    with base_view(model):
        base = answer_logps(model, tokenizer, rows, "completion")
    tuned = answer_logps(model, tokenizer, rows, "completion")
    moved = [t - b for t, b in zip(tuned, base)]
    up = [m for r, m in zip(rows, moved) if r["label"]]
    down = [m for r, m in zip(rows, moved) if not r["label"]]
    out.update({"rows": len(rows), "desirable": len(up)})
    if up and down:
        # the share of (desirable, undesirable) row pairs whose desirable answer the tuned model raised more (or
        # lowered less) than the undesirable one, against the base: an earlier stage's shift of every answer cancels
        wins = sum((u > d) + 0.5 * (u == d) for u in up for d in down)
        out.update({"win_rate_vs_base": wins / (len(up) * len(down)),
                    "logp_change_desirable": sum(up) / len(up), "logp_change_undesirable": sum(down) / len(down)})
        out["task_delta"] = out["win_rate_vs_base"] - 0.5
    return out
