"""The model, checked before its weights load: the hub asked once, the path or hub id, its config (target modules
on a weightless model) and tokenizer (the chat template rendered)."""

from __future__ import annotations

import re
from pathlib import Path

from .. import hub
from ..config import Recipe, looks_local
from ..models import CHATML_TEMPLATE, empty_model, load_tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # a hub repo id, as the hub allows them


def check_model(recipe: Recipe):
    """The model folder, its target modules (on a weightless copy) and the chat template; returns the
    problems and the tokenizer (None when the model cannot be read without a network)."""
    m = recipe.model
    path = recipe.model_path()
    local = Path(path)
    where = recipe.locate("model", "name_or_path")
    if not local.exists():
        # "demo/tiny-lama" is a mistyped local path when demo/ exists here, not a hub id to try for minutes
        first = Path(m.name_or_path).parts[0] if m.name_or_path else ""
        local_parent = "/" in m.name_or_path and recipe.resolve(first) is not None
        if not HUB_ID.match(m.name_or_path) or m.name_or_path.startswith((".", "/", "~")) or local_parent:
            return [f"{where}: folder not found: {m.name_or_path} (looked in the current folder and beside the "
                    "recipe)"], None
        if not _in_hub_cache(m.name_or_path, m.revision):
            problem = _uncached_model(m.name_or_path, m.revision, where)
            if problem:
                return [problem], None
            # on the hub and reachable: its config and tokenizer (small files) are read from there below
    else:
        if not local.is_dir():
            return [f"{where}: {path} is a file; give the model's folder"], None
        missing = []
        if not (local / "config.json").is_file():
            missing.append("config.json")
        if not list(local.glob("*.safetensors")):
            missing.append("*.safetensors weights (prefopt loads safetensors only)")
        if missing:
            return [f"{where}: {path} has no {' and no '.join(missing)}"], None
    problems, tokenizer = [], None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:
        return [f"{where}: cannot read the model's config.json: {str(e).splitlines()[0]}"], None
    problems += check_target_modules(recipe, cfg)
    try:
        tokenizer = load_tokenizer(path, chat_template=None, revision=m.revision,
                                   trust_remote_code=m.trust_remote_code)
    except Exception as e:
        return problems + [f"{where}: cannot load the tokenizer: {str(e).splitlines()[0]}"], None
    probs = check_chat_template(recipe, tokenizer)
    return problems + probs, (None if probs else tokenizer)


def hub_ids(recipe: Recipe) -> list[tuple[str, str]]:
    """The hub repos the run will read: ("model" | "dataset", id)."""
    out = []
    if recipe.resolve(recipe.model.name_or_path) is None and HUB_ID.match(recipe.model.name_or_path):
        out.append(("model", recipe.model.name_or_path))
    for st in recipe.stages:
        paths = [src.path for src in st.data.sources()] + [st.data.eval_path] + list(st.data.quality.decontaminate)
        out += [("dataset", p) for p in paths if p and not looks_local(p) and HUB_ID.match(p)]
    ev = recipe.eval
    if ev is not None and ev.mmlu is not None and recipe.resolve(ev.mmlu.path) is None \
            and HUB_ID.match(ev.mmlu.path):
        out.append(("dataset", ev.mmlu.path))
    return out


def check_hub(recipe: Recipe) -> list[str]:
    """Ask the hub once (short timeout) when the run will read from it; unreachable: work offline from the local
    cache from here on, rather than have every file retried for most of a minute. Returns warnings."""
    ids = hub_ids(recipe)
    if not ids or hub.offline():
        return []
    kind, repo = ids[0]
    state, why = hub.ask(repo, kind=kind, revision=recipe.model.revision if kind == "model" else None)
    if state != "unreachable":
        return []
    hub.go_offline()
    return [f"the hub ({hub.endpoint()}) cannot be reached ({why}): working offline from the local cache, as "
            "HF_HUB_OFFLINE=1 would (set it yourself to skip this check)"]


def _uncached_model(repo: str, revision: str | None, where: str) -> str | None:
    """The problem with a model id the local hub cache does not hold, after asking the hub once; None: on the hub."""
    fixes = (f"download it once where the network is reachable (`hf download {repo}`) and set HF_HUB_OFFLINE=1, or "
             "give a local folder")
    if hub.offline():
        unreachable = hub.unreachable()
        why = (f"the hub ({hub.endpoint()}) cannot be reached ({unreachable})" if unreachable
               else "HF_HUB_OFFLINE is set")
        return f"{where}: '{repo}' is not a local folder and not in the local hub cache, and {why}; {fixes}"
    state, detail = hub.ask(repo, kind="model", revision=revision)
    if state == "ok":
        return None
    if state == "unreachable":
        hub.go_offline()
        return (f"{where}: '{repo}' is not a local folder and not in the local hub cache, and the hub "
                f"({hub.endpoint()}) cannot be reached ({detail}); {fixes}, or connect to the network")
    if state == "gated":
        return (f"{where}: '{repo}' is gated on the hub: accept its licence on its page and log in (`hf auth login` "
                "or HF_TOKEN)")
    if state == "revision":
        return f"{where}: '{repo}' has no revision '{revision}' on the hub (model.revision)"
    return (f"{where}: '{repo}' is not on the hub ({detail}); check the id, or log in (`hf auth login`) if it is "
            "private")


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:
        return False


def check_target_modules(recipe: Recipe, cfg) -> list[str]:
    """Each target_modules entry must name a module of the model (PEFT's matching), checked on the meta device."""
    tm = recipe.adapter.target_modules
    if tm == "all-linear":
        return []
    import torch

    model = empty_model(cfg, trust_remote_code=recipe.model.trust_remote_code)
    out = model.get_output_embeddings()
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not out]
    where = recipe.locate("adapter", "target_modules")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(tm, str):
        if not any(re.fullmatch(tm, n) for n in names):
            return [f"{where}: the pattern {tm!r} matches no linear module of the model (they are named "
                    f"{', '.join(leaves)}, e.g. {names[0] if names else '-'})"]
        return []
    missing = [t for t in tm if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        return [f"{where}: {', '.join(repr(t) for t in missing)} {'matches' if len(missing) == 1 else 'match'} no "
                f"module of the model; its linear modules are {', '.join(leaves)}"]
    return []


def check_chat_template(recipe: Recipe, tokenizer) -> list[str]:
    """Compile the chat template the stages will use and render it on a conversation."""
    ct = recipe.model.chat_template
    if ct == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif ct:
        tokenizer.chat_template = ct
    convo = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]
    try:
        tokenizer.apply_chat_template(convo, tokenize=False)
        tokenizer.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True)
    except Exception as e:
        whose = "" if ct else " (the tokenizer's own; set model.chat_template to replace it)"
        line = getattr(e, "lineno", None)
        at = f" at template line {line}" if line else ""
        return [f"{recipe.locate('model', 'chat_template')}: the chat template{whose} does not render{at}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    return []
