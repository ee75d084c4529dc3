"""Rows as the trainers will see them: token ids, what is trained, and what truncation to max_length leaves.

SFT rows are tokenized here (not by TRL), with a mask of the tokens the loss is taken on: by default every
assistant turn, end-of-turn token included, and nothing else (TRL's own `assistant_only_loss` needs a template with
`{% generation %}` markers, which most models' templates lack). The assistant spans come from rendering the
conversation's prefixes with the model's own chat template, so any prefix-preserving template works.
Preference rows are measured the way TRL's DPO/ORPO/CPO trainers tokenize them (chat template, then truncation
keeping the start).
"""

from __future__ import annotations

from ..config import DataError


def _render(tokenizer, msgs, **kw) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, **kw)


def assistant_spans(tokenizer, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (as the template writes them,
    end-of-turn marker included, the assistant header excluded)."""
    full = _render(tokenizer, msgs)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, msgs[:k], add_generation_prompt=True) if k else ""
        upto = _render(tokenizer, msgs[: k + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            raise DataError(
                "the chat template does not render a conversation's first turns as a prefix of the whole "
                "conversation, so the assistant turns cannot be located; set train.loss_on: all, or use a "
                "prefix-preserving chat template (model.chat_template)", key=None)
        if not k:  # an assistant turn first: its header is whatever the template writes before the content
            head = upto[: upto.find(m["content"])] if m["content"] in upto else ""
        spans.append((len(head), len(upto)))
    return full, spans


def encode_sft(rows: list[dict], tokenizer, loss_on: str = "assistant") -> list[dict]:
    """{"input_ids", "assistant_masks"} per canonical SFT row (1 = trained)."""
    out = []
    texts, spans_of = [], []
    for r in rows:
        if "text" in r:
            eos = tokenizer.eos_token or ""
            text = r["text"] if r["text"].endswith(eos) else r["text"] + eos
            texts.append(text)
            spans_of.append(None)
        elif loss_on == "all":
            texts.append(_render(tokenizer, r["messages"]))
            spans_of.append(None)
        else:
            text, spans = assistant_spans(tokenizer, r["messages"])
            texts.append(text)
            spans_of.append(spans)
    plain = [t for t, r in zip(texts, rows) if "text" in r]
    enc_plain = iter(tokenizer(plain)["input_ids"]) if plain else iter(())
    chat_idx = [i for i, r in enumerate(rows) if "text" not in r]
    enc_chat = tokenizer([texts[i] for i in chat_idx], add_special_tokens=False, return_offsets_mapping=True) \
        if chat_idx else None
    chat_pos = {i: j for j, i in enumerate(chat_idx)}
    for i, r in enumerate(rows):
        if "text" in r:
            ids = next(enc_plain)
            out.append({"input_ids": ids, "assistant_masks": [1] * len(ids)})
            continue
        j = chat_pos[i]
        ids = enc_chat["input_ids"][j]
        spans = spans_of[i]
        if spans is None:
            mask = [1] * len(ids)
        else:
            offs = enc_chat["offset_mapping"][j]
            mask = [int(any(s <= a < e for s, e in spans)) for a, _ in offs]
        out.append({"input_ids": ids, "assistant_masks": mask})
    return out


def sft_lengths(encoded: list[dict]) -> list[tuple[int, int, int]]:
    """(total tokens, trained tokens, index of the first trained token or -1) per encoded row."""
    out = []
    for e in encoded:
        m = e["assistant_masks"]
        first = m.index(1) if 1 in m else -1
        out.append((len(m), sum(m), first))
    return out


def encode_preference(rows: list[dict], tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, prompt+chosen ids, prompt+rejected ids) per row, as TRL tokenizes them."""
    conv = bool(rows) and isinstance(rows[0]["prompt"], list)
    if conv:
        p = [_render(tokenizer, r["prompt"], add_generation_prompt=True) for r in rows]
        c = [_render(tokenizer, r["prompt"] + r["chosen"]) for r in rows]
        j = [_render(tokenizer, r["prompt"] + r["rejected"]) for r in rows]
        kw = {"add_special_tokens": False}
    else:
        p = [r["prompt"] for r in rows]
        c = [r["prompt"] + r["chosen"] for r in rows]
        j = [r["prompt"] + r["rejected"] for r in rows]
        kw = {}
    enc = tokenizer(p + c + j, **kw)["input_ids"]
    n = len(rows)
    return list(zip(enc[:n], enc[n: 2 * n], enc[2 * n:]))


def content_tokens(rows: list[dict], tokenizer) -> list[int]:
    """Tokens of each row's own text (prompt and the shorter answer, or the conversation, or the text), no template."""
    from .quality import answer_text

    texts = []
    for r in rows:
        if "prompt" in r:
            p = answer_text(r["prompt"])
            a = min(answer_text(r["chosen"]), answer_text(r["rejected"]), key=len)
            texts.append(p + "\n" + a)
        elif "messages" in r:
            texts.append("\n".join(m["content"] for m in r["messages"]))
        else:
            texts.append(r["text"])
    return [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
