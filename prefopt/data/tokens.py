"""Rows as the trainers will see them: token ids, what is trained, and what truncation to max_length leaves.

SFT rows are tokenized here (not by TRL), with a mask of the tokens the loss is taken on: by default every
assistant turn, end-of-turn token included, and nothing else (TRL's own `assistant_only_loss` needs a template with
`{% generation %}` markers, which most models' templates lack). The assistant spans come from rendering the
conversation's prefixes with the model's own chat template, so any prefix-preserving template works.
Preference rows are measured the way TRL's DPO/ORPO/CPO trainers tokenize them (chat template, then truncation
keeping the start).
"""

from __future__ import annotations

from ..errors import DataError
from .quality import answer_text, words


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
    if not rows:
        return []
    enc = tokenizer(p + c + j, **kw)["input_ids"]
    n = len(rows)
    return list(zip(enc[:n], enc[n: 2 * n], enc[2 * n:]))


def content_tokens(rows: list[dict], tokenizer) -> list[int]:
    """Tokens of each row's own text (prompt and the shorter answer, or the conversation, or the text), no template."""

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


STATS_SAMPLE = 2000  # rows tokenized for the length statistics (every row that might be cut is tokenized anyway)


def _stats(xs: list[int]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": q(0.5), "p95": q(0.95), "max": s[-1]}


def _nbytes(v) -> int:
    if isinstance(v, str):
        return len(v.encode())
    return sum(len(m["content"].encode()) for m in v)


class _Bound:
    """An upper bound on a row's tokens without tokenizing it: every token of a byte-level BPE, byte-fallback
    SentencePiece or WordPiece vocabulary covers at least one byte of the text, and a chat template adds the same
    bytes whatever the content (measured once per sequence of roles, with one-byte contents). A small slack per
    message covers a SentencePiece prefix piece and added special tokens. Rows under max_length by this bound cannot
    be cut, so only the others are tokenized."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict = {}

    def overhead(self, msgs) -> int:
        if isinstance(msgs, str):
            return 0
        key = tuple(m["role"] for m in msgs)
        if key not in self.cache:
            probe = [{"role": r, "content": "x"} for r in key]
            self.cache[key] = len(_render(self.tok, probe).encode()) - len(key)
        return self.cache[key]

    def __call__(self, msgs_or_text, n_msgs: int) -> int:
        return self.overhead(msgs_or_text) + _nbytes(msgs_or_text) + 2 * n_msgs + 4


def token_checks(rows: list[dict], kind: str, tokenizer, L: int | None, min_tokens: int, loss_on: str, seed: int):
    """([(row index, reason, why)], statistics): too_long, identical_pair after truncation, too_short; rows are
    tokenized exactly when they might reach max_length, or might be too short, or are in the statistics sample."""
    import random

    unpaired = set()
    if kind == "unpaired":  # a single answer checks as a pair of two identical answers (but is no identical pair)
        unpaired = {k for k, r in enumerate(rows) if "completion" in r}
        rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"]} if k in unpaired
                else r for k, r in enumerate(rows)]
        kind = "preference"
    bound = _Bound(tokenizer)
    sample = set(random.Random(f"{seed}:tokens").sample(range(len(rows)), min(STATS_SAMPLE, len(rows))))
    exact, short = [], []
    drops: dict[int, tuple[str, str]] = {}
    for k, r in enumerate(rows):
        try:
            n, text = _bound_and_text(r, kind, bound)
        except Exception as e:  # the model's chat template refuses this sequence of roles (e.g. not alternating)
            drops[k] = ("invalid", f"the chat template refuses it: {str(e).splitlines()[0] if str(e) else e!r}")
            continue
        if (L is not None and n >= L) or k in sample:
            exact.append(k)
        if len(words(text)) < min_tokens:  # a word is at least one token: only rows of few words can be too short
            short.append(k)
    lengths, prompts, truncated = [], [], 0
    exact = [k for k in exact if k not in drops]
    sub = [rows[k] for k in exact]
    if kind == "preference":
        encoded = _per_row(encode_preference, sub, tokenizer)
        for k, enc in zip(exact, encoded):
            if isinstance(enc, Exception):
                drops[k] = ("invalid", f"cannot be tokenized: {enc}")
                continue
            p, c, r = enc
            if L is not None and len(p) >= L:
                drops[k] = ("too_long", f"the prompt is {len(p)} tokens, max_length {L}: truncation leaves no answer")
            elif L is not None and k not in unpaired and c[:L] == r[:L]:
                drops[k] = ("identical_pair", f"chosen and rejected are the same {L} tokens once truncated")
            else:
                truncated += bool(L is not None and max(len(c), len(r)) > L)
                if k in sample:
                    lengths.append(max(len(c), len(r)))
                    prompts.append(len(p))
    else:
        encoded = _per_row(lambda rs, tok: encode_sft(rs, tok, loss_on), sub, tokenizer)
        for k, enc in zip(exact, encoded):
            if isinstance(enc, Exception):
                drops[k] = ("invalid", f"cannot be tokenized: {enc}")
                continue
            (total, trained, first), = sft_lengths([enc])
            if trained == 0:
                drops[k] = ("invalid", "no token to train on")
            elif L is not None and first >= L:
                drops[k] = ("too_long", f"the first trained token is at {first}, max_length {L}: truncation leaves "
                            "nothing to train on")
            else:
                truncated += bool(L is not None and total > L)
                if k in sample:
                    lengths.append(total)
                    prompts.append(first)
    return _finish(rows, drops, short, tokenizer, min_tokens, L, exact, lengths, prompts, truncated)


def _bound_and_text(r: dict, kind: str, bound) -> tuple[int, str]:
    if kind == "preference":
        conv = isinstance(r["prompt"], list)
        n = max(bound(r["prompt"] + r[a], len(r["prompt"]) + len(r[a])) if conv else bound(r["prompt"] + r[a], 1)
                for a in ("chosen", "rejected"))
        return n, (r["prompt"] if not conv else " ".join(m["content"] for m in r["prompt"]))
    if "text" in r:
        return bound(r["text"], 1), r["text"]
    return bound(r["messages"], len(r["messages"])), " ".join(m["content"] for m in r["messages"])


def _per_row(encode, rows, tokenizer) -> list:
    """encode(rows) in one batch; when the batch fails, row by row, an Exception standing for each row that fails."""
    if not rows:
        return []
    try:
        return list(encode(rows, tokenizer))
    except Exception:
        out = []
        for r in rows:
            try:
                out.append(encode([r], tokenizer)[0])
            except Exception as e:
                out.append(e)
        return out


def _finish(rows, drops, short, tokenizer, min_tokens, L, exact, lengths, prompts, truncated):
    kind_key = "prompt" if rows and "prompt" in rows[0] else "before_first_trained_token"
    short = [k for k in short if k not in drops]
    for k, n in zip(short, content_tokens([rows[k] for k in short], tokenizer) if short else []):
        if n < min_tokens:
            drops[k] = ("too_short", f"{n} tokens of text (min_tokens {min_tokens})")
    stats = {"max_length": L, "truncated_rows": truncated, "rows_tokenized": len(exact),
             "sampled_rows": len(lengths), "sequence": _stats(lengths), kind_key: _stats(prompts)}
    return [(k, *drops[k]) for k in sorted(drops)], stats

