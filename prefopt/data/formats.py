"""Row formats -> prefopt's canonical rows, with every row that cannot train dropped and counted by reason.

Canonical rows (what TRL trains on):
- SFT: {"messages": [{role, content}, ...]} (chat; every assistant turn trained) or {"text": str} (plain text).
- preference: {"prompt", "chosen", "rejected"}, all strings (standard) or all message lists (conversational).
- unpaired (KTO): {"prompt", "completion", "label"}, label a boolean (true: desirable), prompt and completion strings
  or message lists; a preference pair read by a KTO stage stays a pair through the filters and the split and is then
  split into two such rows (split_pair).

Formats read (detected per source from its first row):
- SFT: OpenAI `messages`; ShareGPT `conversations` ({from, value}); Alpaca `instruction`/`input`/`output`;
  `prompt`/`completion`; plain `text`.
- unpaired: `prompt`/`completion`/`label`, and every preference format below (pairs to split).
- preference: `prompt`/`chosen`/`rejected` as strings or message lists (UltraFeedback-binarized: a string prompt and
  answers that repeat it as a message list); HH-RLHF (`chosen`/`rejected` transcripts "\\n\\nHuman: ... \\n\\nAssistant:
  ..." sharing every turn but the last); ShareGPT preference (`conversations` + `chosen`/`rejected` {from, value}).

A row whose *structure* is wrong (not an object, a key of its format missing, a number where text belongs) is a
DataError naming file and row: the file is not what the recipe says. A row whose *content* cannot train is dropped
and counted: `empty` (an empty or whitespace-only field), `invalid` (an unknown role, a conversation without an
assistant turn, answers that are not assistant turns, HH transcripts without a shared prompt).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from ..errors import DataError

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function_call": "assistant", "observation": "tool"}
SFT_FORMATS = {  # format: keys that identify it (first match wins)
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
PREF_FORMATS = {
    "sharegpt": ("conversations", "chosen", "rejected"),
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),
}
# unpaired rows (KTO): one answer and whether it is desirable; a KTO stage also reads every PREF_FORMATS file, each
# pair kept whole through the filters and the split, then split into a desirable and an undesirable row
UNPAIRED_FORMATS = {"prompt_completion_label": ("prompt", "completion", "label")}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class _Drop(Exception):
    """This row cannot train: reason (`empty` | `invalid`) and why."""

    def __init__(self, reason: str, why: str):
        super().__init__(why)
        self.reason = reason


class _Bad(Exception):
    """This row's structure is wrong for its format (a DataError for the whole file)."""


@dataclass
class Normalised:
    rows: list[dict]
    fmt: str  # the source's format (alpaca, hh_rlhf, ...)
    origins: list[int]  # the 1-based row number in the source of each kept row
    form: str = ""  # what the rows are now: messages | text (SFT), standard | conversational (preference)
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> [{"source", "row", "why"}]
    dropped_rows: list = field(default_factory=list)  # (1-based row, reason, why) of every dropped row


def _text(v, what: str) -> str:
    if v is None:
        raise _Drop("empty", f"{what} is null")
    if not isinstance(v, str):
        raise _Bad(f"{what} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise _Drop("empty", f"{what} is empty or whitespace only")
    return v


def _messages(v, what: str, *, role_key="role", content_key="content", roles=None) -> list[dict]:
    """A list of {role, content}; empty system turns are left out (datasets carry `system: ""` routinely)."""
    if v is None or v == []:
        raise _Drop("empty", f"{what} is empty")
    if not isinstance(v, list) or not all(isinstance(m, dict) for m in v):
        raise _Bad(f"{what} must be a list of {{{role_key}, {content_key}}} objects")
    out = []
    for j, m in enumerate(v):
        if role_key not in m or content_key not in m:
            raise _Bad(f"{what}[{j}] needs `{role_key}` and `{content_key}`, got keys {sorted(m)}")
        role = m[role_key]
        if not isinstance(role, str):
            raise _Bad(f"{what}[{j}].{role_key} must be a string")
        role = (roles or {}).get(role.lower(), role) if roles else role
        if role not in ROLES:
            raise _Drop("invalid", f"{what}[{j}]: unknown role '{m[role_key]}' (known: {', '.join(sorted(ROLES))})")
        content = m[content_key]
        if role == "system" and isinstance(content, str) and not content.strip():
            continue
        out.append({"role": role, "content": _text(content, f"{what}[{j}].{content_key}")})
    if not out:
        raise _Drop("empty", f"{what} is empty")
    return out


def _as_messages(v, what: str, default_role: str) -> list[dict]:
    if not isinstance(v, (str, list)) and v is not None:
        raise _Bad(f"{what} must be a string or a list of {{role, content}} messages, got {type(v).__name__}")
    return [{"role": default_role, "content": _text(v, what)}] if isinstance(v, str) or v is None else \
        _messages(v, what)


def _sft_row(row: dict, fmt: str) -> dict:
    if fmt == "text":
        return {"text": _text(row["text"], "text")}
    if fmt == "messages":
        msgs = _messages(row["messages"], "messages")
    elif fmt == "sharegpt":
        msgs = _messages(row["conversations"], "conversations", role_key="from", content_key="value",
                         roles=SHAREGPT_ROLES)
    elif fmt == "alpaca":
        inp = row.get("input")
        if inp is not None and not isinstance(inp, str):
            raise _Bad("input must be a string")
        user = _text(row["instruction"], "instruction") + (f"\n\n{inp}" if inp and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row["output"], "output")}]
    else:  # prompt_completion
        msgs = (_as_messages(row["prompt"], "prompt", "user")
                + _as_messages(row["completion"], "completion", "assistant"))
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Drop("invalid", "no assistant turn: nothing to train on")
    return {"messages": msgs}


def _hh_turns(text, what: str) -> list[dict]:
    text = _text(text, what)
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip() or len(parts) < 3:
        raise _Drop("invalid", f"{what} is not an HH-RLHF transcript (\\n\\nHuman: ... \\n\\nAssistant: ...)")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
             for who, said in zip(parts[1::2], parts[2::2])]
    for j, t in enumerate(turns):
        if not t["content"]:
            raise _Drop("empty", f"{what} turn {j + 1} is empty")
    return turns


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> dict:
    """Whole conversations for both answers: the prompt is every turn they share but the last answer."""
    if chosen[:-1] != rejected[:-1]:
        raise _Drop("invalid", "chosen and rejected do not share the same prompt turns")
    if len(chosen) < 2:
        raise _Drop("invalid", "no prompt turn before the answers")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _check_answers(row: dict) -> dict:
    for k in ("chosen", "rejected"):
        ans = row[k]
        if isinstance(ans, list) and not any(m["role"] == "assistant" for m in ans):
            raise _Drop("invalid", f"{k} has no assistant turn")
    return row


def _pref_row(row: dict, fmt: str) -> dict:
    if fmt == "hh_rlhf":
        c, r = row["chosen"], row["rejected"]
        if isinstance(c, list) or isinstance(r, list):  # whole conversations as message lists
            return _check_answers(_split_shared_prompt(_messages(c, "chosen"), _messages(r, "rejected")))
        return _check_answers(_split_shared_prompt(_hh_turns(c, "chosen"), _hh_turns(r, "rejected")))
    if fmt == "sharegpt":
        prompt = _messages(row["conversations"], "conversations", role_key="from", content_key="value",
                           roles=SHAREGPT_ROLES)
        answers = {}
        for k in ("chosen", "rejected"):
            v = row[k]
            v = [v] if isinstance(v, dict) else v
            answers[k] = _messages(v, k, role_key="from", content_key="value", roles=SHAREGPT_ROLES)
        return _check_answers({"prompt": prompt, **answers})
    vals = {k: row[k] for k in ("prompt", "chosen", "rejected")}
    if all(isinstance(v, str) or v is None for v in vals.values()):
        return {k: _text(v, k) for k, v in vals.items()}
    conv = {"prompt": _as_messages(vals["prompt"], "prompt", "user"),
            "chosen": _as_messages(vals["chosen"], "chosen", "assistant"),
            "rejected": _as_messages(vals["rejected"], "rejected", "assistant")}
    n = len(conv["prompt"])

    def same(a, b):  # the repeated prompt, up to surrounding whitespace
        return all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip() for x, y in zip(a, b))

    for k in ("chosen", "rejected"):  # UltraFeedback-binarized repeats the prompt inside each answer
        if len(conv[k]) > n and same(conv[k][:n], conv["prompt"]):
            conv[k] = conv[k][n:]
    return _check_answers(conv)


def _unpaired_row(row: dict, fmt: str) -> dict:
    label = row["label"]
    if not isinstance(label, bool):
        got = "null" if label is None else json.dumps(label) if isinstance(label, (int, float, str)) else repr(label)
        raise _Bad(f"label must be true (desirable) or false (undesirable), a JSON boolean (in a CSV file: the words "
                   f"true / false); got {got}")
    p, c = row["prompt"], row["completion"]
    if (isinstance(p, str) or p is None) and (isinstance(c, str) or c is None):
        return {"prompt": _text(p, "prompt"), "completion": _text(c, "completion"), "label": label}
    conv = {"prompt": _as_messages(p, "prompt", "user"), "completion": _as_messages(c, "completion", "assistant"),
            "label": label}
    if not any(m["role"] == "assistant" for m in conv["completion"]):
        raise _Drop("invalid", "completion has no assistant turn")
    return conv


def _formats(kind: str) -> dict:
    """The formats a kind of stage reads, in detection order."""
    return {"preference": PREF_FORMATS, "unpaired": {**UNPAIRED_FORMATS, **PREF_FORMATS}}.get(kind, SFT_FORMATS)


def detect(row, kind: str) -> str | None:
    if not isinstance(row, dict):
        return None
    for fmt, keys in _formats(kind).items():
        if all(k in row for k in keys):
            return fmt
    return None


def _expected(kind: str) -> str:
    if kind == "unpaired":
        return ("prompt/completion/label (label true or false; strings or message lists), or a preference pair "
                "format (" + _expected("preference") + "), whose pairs are split")
    if kind == "preference":
        return ("prompt/chosen/rejected (strings or message lists), HH-RLHF chosen/rejected transcripts, or ShareGPT "
                "conversations + chosen/rejected")
    return ("messages (chat), conversations (ShareGPT), instruction/output (Alpaca), prompt/completion, or text")


def normalise_rows(rows: list, label: str, kind: str, *, limit: int = 20, strict: bool = False) -> Normalised:
    """Canonical rows of one source; content problems dropped and counted (strict: raised too), structural problems
    raised together."""
    if not rows:
        raise DataError(f"{label}: no rows")
    first = rows[0]
    fmt = detect(first, kind)
    if fmt is None:
        got = f"keys {sorted(first)}" if isinstance(first, dict) else f"a {type(first).__name__}"
        what = {"preference": "preference", "unpaired": "KTO (unpaired)"}.get(kind, "SFT")
        raise DataError(f"{label} row 1: not a {what} row in a format prefopt reads; expected {_expected(kind)}, "
                        f"got {got}")
    if kind == "sft" and fmt == "prompt_completion" and isinstance(first.get("label"), bool):
        raise DataError(f"{label} row 1: the rows carry a true/false `label` (KTO feedback): an SFT stage would train "
                        "on the undesirable answers too; use the file in a kto stage, or keep only the desirable rows")
    convert = _unpaired_row if fmt in UNPAIRED_FORMATS else _pref_row if fmt in PREF_FORMATS and kind != "sft" \
        else _sft_row
    keys = _formats(kind)[fmt]
    out = Normalised(rows=[], fmt=fmt, form="", origins=[])
    problems = []
    csv_labels = fmt in UNPAIRED_FORMATS and label.lower().endswith(".csv")
    for i, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise _Bad(f"not an object ({type(row).__name__})")
            missing = [k for k in keys if k not in row]
            if missing:
                raise _Bad(f"missing {', '.join(missing)} (the file's rows are in the {fmt} format)")
            if csv_labels and isinstance(row["label"], str) and row["label"].strip().lower() in ("true", "false"):
                row = {**row, "label": row["label"].strip().lower() == "true"}  # CSV has no booleans: its words
            out.rows.append(convert(row, fmt))
            out.origins.append(i)
        except _Bad as e:
            problems.append((i, str(e)))
        except _Drop as e:
            if strict:
                problems.append((i, f"{e} (a row that cannot train: {e.reason})"))
                continue
            out.dropped[e.reason] += 1
            out.dropped_rows.append((i, e.reason, str(e)))
            ex = out.examples.setdefault(e.reason, [])
            if len(ex) < 3:
                ex.append({"source": label, "row": i, "why": str(e)})
    if problems:
        shown = _folded(problems, label)
        more = f"\n  ... and {len(shown) - limit} more" if len(shown) > limit else ""
        raise DataError("\n  ".join(shown[:limit]) + more)
    if kind in ("preference", "unpaired"):
        out.form = "conversational" if any(isinstance(r["prompt"], list) for r in out.rows) else "standard"
        if out.form == "conversational":
            out.rows = [to_conversational(r) for r in out.rows]
    else:
        out.form = "text" if fmt == "text" else "messages"
    return out


def _folded(problems: list[tuple[int, str]], label: str) -> list[str]:
    """One line per distinct problem: 'file row 4: ...', or 'file rows 1, 2, 3, ... (320 rows): ...' when many rows
    share it (a whole file in the wrong shape is one line, not hundreds)."""
    rows: dict[str, list[int]] = {}
    for i, msg in problems:
        rows.setdefault(msg, []).append(i)
    out = []
    for msg, at in rows.items():
        if len(at) == 1:
            out.append(f"{label} row {at[0]}: {msg}")
        else:
            listed = ", ".join(map(str, at[:5])) + (", ..." if len(at) > 5 else "")
            out.append(f"{label} rows {listed} ({len(at)} rows): {msg}")
    return out


def to_conversational(row: dict) -> dict:
    """A standard preference (or unpaired) row as messages (so sources of both forms can be mixed)."""
    if isinstance(row["prompt"], list):
        return row
    if "completion" in row:
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["completion"]}], "label": row["label"]}
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def split_pair(row: dict) -> list[dict]:
    """A preference pair as two unpaired rows: the chosen answer desirable, the rejected one not."""
    return [{"prompt": row["prompt"], "completion": row["chosen"], "label": True},
            {"prompt": row["prompt"], "completion": row["rejected"], "label": False}]


def _strict(rows, label: str, kind: str) -> tuple[list[dict], str]:
    """For rows handed in code: nothing is dropped silently, so a row that would be dropped is an error."""
    n = normalise_rows(rows, label, kind, strict=True)
    if kind == "unpaired":
        n.rows = [x for r in n.rows for x in (split_pair(r) if "chosen" in r else [r])]
    return n.rows, (n.form if kind in ("preference", "unpaired") else n.fmt)


def normalise_sft(rows, label: str) -> tuple[list[dict], str]:
    """Rows to TRL's chat `messages` (or `text`); a row that cannot train is a DataError."""
    return _strict(rows, label, "sft")


def normalise_unpaired(rows, label: str) -> tuple[list[dict], str]:
    """Rows to TRL's unpaired format ({prompt, completion, label}; pairs split); a row that cannot train is a
    DataError."""
    return _strict(rows, label, "unpaired")


def normalise_preference(rows, label: str) -> tuple[list[dict], str]:
    """Rows to TRL's preference format (standard strings or conversational); a row that cannot train is a DataError."""
    return _strict(rows, label, "preference")
