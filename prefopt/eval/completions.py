"""Completions side by side: the same prompts through the base (adapter disabled) and the tuned model, greedy
and seeded, written to eval/completions.jsonl and eval/completions.md for a person to read."""

from __future__ import annotations

import json
from pathlib import Path

from ..models import base_view


def prompt_of(row: dict):
    """The prompt of a held-out row: a preference row's prompt; a chat's turns before the last assistant turn;
    an Alpaca row is already chat by now; a plain-text row's first half."""
    if "prompt" in row:
        return row["prompt"]
    if "messages" in row:
        msgs = row["messages"]
        last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return msgs[:last] or msgs
    text = row.get("text", "")
    return text[: max(1, len(text) // 2)]


def reference_of(row: dict) -> str | None:
    """The reference answer of an SFT row (its last assistant turn), if it has one."""
    msgs = row.get("messages")
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[-1]["content"]
    return None


def read_prompts(path: str) -> list:
    """A prompts file: .txt (one prompt a line) or .jsonl (a string, or an object with `prompt` or `messages`)."""
    p = Path(path)
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if p.suffix == ".txt":
            out.append(line)
            continue
        obj = json.loads(line)
        out.append(obj if isinstance(obj, str) else prompt_of(obj))
    return out


def render(tokenizer, prompt) -> str:
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def show(prompt) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return prompt


def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, seed: int, batch_size: int = 32) -> list[str]:
    """Greedy completions of each prompt by `model` as it is (the caller chooses adapter on or off)."""
    import torch
    from transformers import set_seed

    set_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    device = next(model.parameters()).device
    outs = []
    was_training = model.training
    model.eval()
    try:
        for k in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p) for p in prompts[k: k + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def side_by_side(model, tokenizer, prompts: list, *, max_new_tokens: int, seed: int) -> list[dict]:
    with base_view(model):
        base = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    tuned = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    return [{"index": k, "prompt": show(p), "base": b, "tuned": t}
            for k, (p, b, t) in enumerate(zip(prompts, base, tuned))]


def to_markdown(rows: list[dict], title: str) -> str:
    out = [f"# {title}\n", f"{len(rows)} prompts, greedy decoding; base = the base model (adapter disabled; after a "
           "pissa/olora init, its initial adapter), tuned = final adapter.\n"]
    for r in rows:
        out.append(f"## {r['index'] + 1}\n\n**Prompt**\n\n```\n{r['prompt']}\n```\n")
        out.append(f"| base | tuned |\n| --- | --- |\n| {_cell(r['base'])} | {_cell(r['tuned'])} |\n")
    return "\n".join(out)


def _cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("\n", "<br>")
