"""Every problem that can be found before a model loads, all at once, each with its key path and YAML line.

`preflight(recipe)` is what `prefopt plan` and the start of `prefopt run` call. It reads the model's config and
tokenizer (never its weights), builds each stage's TRL config as the stage will, loads and checks the data, and
returns the data the stages then train on (so what was checked is what is trained on).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import hub
from .config import PREFERENCE_TYPES, Recipe, load_recipe, looks_local
from .data import data_problem, stage_data
from .dist import launcher_problems
from .errors import DataError, RecipeError, option
from .eval import mmlu
from .memory import model_shape, recipe_memory_plan
from .models import CHATML_TEMPLATE, empty_model, load_tokenizer
from .stages import CHECKS, CONFIGS, OPTIONS
from .stages.common import training_args
from .tracking import effective_mode, has_credentials


@dataclass
class Checked:
    """What preflight found: each stage's data after the data step (filtered, split, with its report) and notes."""

    data: list = field(default_factory=list)  # StageData per stage
    warnings: list = field(default_factory=list)


def preflight(recipe: Recipe, *, echo=None, output_dir: str | Path | None = None) -> Checked:
    """Every problem, all at once (RecipeError). `output_dir`: the run folder the run will write (checked for
    writability and free space); None checks nothing on disk."""
    problems: list[str] = []
    checked = Checked()
    checked.warnings += check_hub(recipe)  # first: an unreachable hub makes the rest work from the local cache
    configs = []
    for i, st in enumerate(recipe.stages):
        problems += [_located(recipe, p) for p in CHECKS[st.type](st, f"stages[{i}]")]
        named = check_train_names(recipe, i)
        typed = check_kwarg_types(recipe, i)
        cfg, probs = build_trl_config(recipe, i) if not named else (None, [])
        configs.append(None if typed else cfg)  # a config holding a wrong-typed value checks nothing further
        problems += named + typed + probs
    problems += check_wandb(recipe)
    problems += check_eval(recipe)
    problems += launcher_problems(quantization=recipe.model.quantization, quant_storage=recipe.model.quant_storage,
                                  quant_key=recipe.locate("model", "quantization"),
                                  storage_key=recipe.locate("model", "quant_storage"))
    model_problems, tokenizer = check_model(recipe)
    problems += model_problems
    if output_dir is not None:
        problems += check_output(recipe, Path(output_dir), model_ok=not model_problems)

    for i in range(len(recipe.stages)):
        try:
            data = stage_data(recipe, i, tokenizer)
        except DataError as e:
            problems.append(data_problem(recipe, i, e))
            checked.data.append(None)
            continue
        checked.data.append(data)
        if configs[i] is not None and len(data.train):
            problems += check_schedule(recipe, i, configs[i], len(data.train))
    if checked.data and checked.data[-1] is not None:
        problems += check_completion_prompts(recipe, checked.data[-1])
    if problems:
        raise RecipeError(problems, recipe.source)
    for w in checked.warnings:
        (echo or (lambda s: None))(f"prefopt: warning: {w}")
    return checked


def load_checked(path, overrides=None) -> Recipe:
    """load_recipe, except that a recipe with schema problems is also checked further (its bad values left out):
    one report lists every problem -- the schema's, the files', the names', the TRL configs' -- not one kind per
    attempt. A recipe without schema problems is returned as loaded (preflight then runs as usual)."""
    try:
        return load_recipe(path, overrides)
    except RecipeError as e:
        if e.repaired is None:
            raise
        problems = list(e.problems)
        try:
            preflight(e.repaired)
        except RecipeError as more:
            seen = {_key_of(p) for p in problems}
            # the same problem again, or again for the section holding it (a missing file: path and data)
            problems += [p for p in more.problems
                         if not any(k == _key_of(p) or k.startswith(_key_of(p) + ".") for k in seen)]
        raise RecipeError(problems, e.source) from None


def _key_of(problem: str) -> str:
    return problem.split(":", 1)[0].split(" (", 1)[0]


_STAGE_KEY = re.compile(r"^stages\[(\d+)\]((?:\.[\w-]+)*): ")


def _located(recipe: Recipe, problem: str) -> str:
    """A stage module's 'stages[1].trainer_kwargs.foo: ...' with its YAML line (or --set) added."""
    m = _STAGE_KEY.match(problem)
    if not m:
        return problem
    keys = tuple(k for k in m.group(2).split(".") if k)
    return f"{recipe.locate('stages', int(m.group(1)), *keys)}: {problem[m.end():]}"


# ---------------------------------------------------------------------------------------------- names and types


def check_train_names(recipe: Recipe, i: int) -> list[str]:
    """train.optim and train.scheduler against transformers' own enums."""
    import difflib

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    tr = recipe.stages[i].train
    problems = []
    for key, value, enum in (("optim", tr.optim, OptimizerNames), ("scheduler", tr.scheduler, SchedulerType)):
        names = [e.value for e in enum]
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"one of {', '.join(names)}"
            problems.append(f"{recipe.locate('stages', i, 'train', key)}: unknown {key} '{value}'; {hint}")
    return problems


def _field_types(config_cls) -> dict:
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # an annotation that cannot be resolved: fall back to the raw ones
        return {f.name: f.type for f in fields(config_cls)}


def check_kwarg_types(recipe: Recipe, i: int) -> list[str]:
    """trainer_kwargs values against the TRL config's field types (transformers does not check most of them:
    `label_smoothing: 'high'` would be kept, `eval_accumulation_steps: 'two'` would fail after training)."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    st = recipe.stages[i]
    types = _field_types(CONFIGS[st.type]())
    problems = []
    for key, value in st.trainer_kwargs.items():
        hint = types.get(key)
        if hint is None or isinstance(hint, str):
            continue
        try:
            ta = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # a type pydantic cannot describe: TRL's own check (build_trl_config) still runs
            continue
        try:
            ta.validate_python(value)
            if isinstance(value, str):  # "0.1" for a float would pass lax checking and fail inside TRL
                ta.validate_python(value, strict=True)
        except ValidationError:
            shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            fix = ""
            if isinstance(value, str) and _FLOATISH.match(value.strip()):  # YAML 1.1 reads 1e-3 as a string
                fix = f" (YAML reads {value} as a string: write it with a dot and a signed exponent, e.g. " \
                      f"{float(value):.1e}".replace("e-0", "e-").replace("e+0", "e+") + ")"
            problems.append(f"{recipe.locate('stages', i, 'trainer_kwargs', key)}: expects {shown}, got {value!r}{fix}")
    return problems


def build_trl_config(recipe: Recipe, i: int):
    """The stage's TRL config built as the stage builds it (CPU, a temp output folder): its own checks, now."""
    st = recipe.stages[i]
    config_cls = CONFIGS[st.type]()
    known = {f.name for f in fields(config_cls)}
    with tempfile.TemporaryDirectory(prefix="prefopt-preflight-") as tmp:
        base = training_args(st.train, output_dir=tmp, seed=recipe.seed, report_to=[], run_name=st.name,
                             has_eval=True)
        base.update(use_cpu=True, bf16=False)
        kwargs = {k: v for k, v in st.trainer_kwargs.items() if k in known}
        try:
            return config_cls(**{**base, **OPTIONS[st.type](st), **kwargs}), []
        except Exception as e:  # transformers/TRL raise ValueError, TypeError, KeyError, ... for bad settings
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            named = [k for k in kwargs if k in str(e)]
            path = ("stages", i, "trainer_kwargs", named[0]) if named else ("stages", i, "train")
            return None, [f"{recipe.locate(*path)}: trl's {config_cls.__name__} refuses it: {msg}"]


# ---------------------------------------------------------------------------------------------- tracking


def check_wandb(recipe: Recipe) -> list[str]:
    mode, source = effective_mode(recipe.tracking.wandb.mode)
    import importlib.util

    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        return [f"{recipe.locate('tracking', 'wandb', 'mode')}: {mode} needs the wandb package, which is not "
                "installed; pip install wandb, or use mode: disabled"]
    if mode == "online" and not has_credentials():
        via = " (WANDB_MODE=online in the environment overrides the recipe)" if source == "env" else ""
        return [f"{recipe.locate('tracking', 'wandb', 'mode')}: online{via} needs W&B credentials and none were "
                "found (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc); run `wandb login`, or use mode: "
                "offline (sync later) or disabled"]
    return []


# ---------------------------------------------------------------------------------------------- eval


def check_eval(recipe: Recipe) -> list[str]:
    """The eval section's files: a local MMLU folder in the Hendrycks layout (the bad file named), a hub id the
    cache holds when offline, a completions prompts file that exists."""
    ev = recipe.eval
    if ev is None:
        return []
    problems = []
    import importlib.util

    if ev.mmlu is not None and importlib.util.find_spec("lm_eval") is None:
        problems.append(f"{recipe.locate('eval', 'mmlu')}: MMLU runs through lm-evaluation-harness, which is not "
                        "installed; pip install lm-eval, or set eval.mmlu: null")
    if ev.mmlu is not None:
        p = ev.mmlu.path
        where = recipe.locate("eval", "mmlu", "path")
        local = recipe.resolve(p)
        if local is not None:
            problems += [f"{where}: {msg}" for msg in mmlu.check_local_folder(local, ev.mmlu.num_fewshot)[:10]]
        elif not _HUB_ID.match(p) or p.startswith((".", "/", "~")):
            problems.append(f"{where}: folder not found: {p} (looked in the current folder and beside the recipe); "
                            "give a folder in the Hendrycks layout (dev/<subject>_dev.csv, test/<subject>_test.csv) "
                            "or a hub id such as cais/mmlu")
        elif not mmlu.hub_cached(p):
            state, detail = ("unreachable", "") if hub.offline() else hub.ask(p, kind="dataset")
            if state == "unreachable":
                hub.go_offline()
                why = f"the hub cannot be reached ({detail})" if detail else "HF_HUB_OFFLINE is set"
                problems.append(f"{where}: '{p}' is not in the local datasets cache and {why}; download it once "
                                "online, or give a local folder in the Hendrycks layout")
            elif state != "ok":
                problems.append(f"{where}: '{p}' cannot be read from the hub ({detail}); check the id, or give a "
                                "local folder in the Hendrycks layout")
    prompts = ev.completions.prompts
    if prompts:
        where = recipe.locate("eval", "completions", "prompts")
        rp = recipe.resolve(prompts)
        if rp is None or not rp.is_file():
            problems.append(f"{where}: file not found: {prompts}")
        elif rp.suffix not in (".jsonl", ".txt"):
            problems.append(f"{where}: {prompts} is not a .jsonl or .txt file")
    g = ev.gates
    for key, what in (("min_reward_accuracy", "a reward accuracy"), ("min_reward_margin", "a reward margin")):
        if getattr(g, key) is not None and not any(s.type in PREFERENCE_TYPES for s in recipe.stages):
            problems.append(f"{recipe.locate('eval', 'gates', key)}: the recipe has no preference stage to measure "
                            f"{what} on")
    return problems


def check_completion_prompts(recipe: Recipe, last_data) -> list[str]:
    """Completions come from the last stage's held-out rows unless a prompts file is given: enough of them."""
    ev = recipe.eval
    if ev is None or ev.completions.prompts or ev.completions.n == 0:
        return []
    held = len(last_data.eval) if last_data.eval is not None else 0
    if held >= ev.completions.n:
        return []
    return [f"{recipe.locate('eval', 'completions', 'n')}: {ev.completions.n} completions, but the last stage "
            f"'{recipe.stages[-1].name}' holds out {held} rows to take prompts from; lower n, raise its "
            "eval_fraction, or give eval.completions.prompts"]


# ---------------------------------------------------------------------------------------------- model


_FLOATISH = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
        if not _HUB_ID.match(m.name_or_path) or m.name_or_path.startswith((".", "/", "~")) or local_parent:
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
    if recipe.resolve(recipe.model.name_or_path) is None and _HUB_ID.match(recipe.model.name_or_path):
        out.append(("model", recipe.model.name_or_path))
    for st in recipe.stages:
        paths = [src.path for src in st.data.sources()] + [st.data.eval_path] + list(st.data.quality.decontaminate)
        out += [("dataset", p) for p in paths if p and not looks_local(p) and _HUB_ID.match(p)]
    ev = recipe.eval
    if ev is not None and ev.mmlu is not None and recipe.resolve(ev.mmlu.path) is None \
            and _HUB_ID.match(ev.mmlu.path):
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


# ---------------------------------------------------------------------------------------------- the run folder


def check_output(recipe: Recipe, run_dir: Path, *, model_ok: bool = True) -> list[str]:
    """The run folder can be written (a probe file, removed at once) and its disk has room for what the run
    writes where that is known: each stage's adapter, two checkpoints of the largest stage, the merged model."""
    import errno
    import shutil

    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return [f"output folder {run_dir}: {existing} is a file, not a folder; choose another "
                f"{option('output_dir', 'DIR')}"]
    why = None
    if existing == run_dir:  # an existing folder (maybe a finished run): asked, not touched
        if not os.access(existing, os.W_OK | os.X_OK):
            why = "the file system is read-only" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
    else:  # a new folder: a probe file in the folder it will be made in
        try:
            fd, probe = tempfile.mkstemp(prefix=".prefopt-write-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            why = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
                   errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
    if why:
        return [f"output folder {run_dir}: cannot write in {existing} ({why}); choose {option('output_dir', 'DIR')} "
                "on a writable disk"]
    if not model_ok or (run_dir / "run.json").is_file():
        return []  # a run folder already holds what an unchanged stage would write: the need is not known
    need = _bytes_to_write(recipe)
    if need is None:
        return []
    free = shutil.disk_usage(existing).free
    if free < need:
        return [f"output folder {run_dir}: {free / 2**30:.2f} GiB free on its disk, the run writes about "
                f"{need / 2**30:.2f} GiB (adapters, checkpoints{', the merged model' if recipe.merge else ''}); free "
                f"some space or choose {option('output_dir', 'DIR')} on a larger disk"]
    return []


def _bytes_to_write(recipe: Recipe) -> int | None:
    """About what a run writes to its folder, from the model's config (None when it cannot be read)."""
    try:
        plan = recipe_memory_plan(recipe, device="cpu")
    except Exception:
        return None
    stages = plan["stages"]
    adapters = sum(st["components"]["adapter"] for st in stages)
    checkpoints = 2 * max((st["components"]["adapter"] + st["components"]["optimizer"] for st in stages), default=0)
    merged = 0
    if recipe.merge is not None:
        m = recipe.model
        shape = model_shape(recipe.model_path(), revision=m.revision, trust_remote_code=m.trust_remote_code)
        params = shape.other_params + sum(i * o for _, i, o in shape.linears)
        merged = params * (4 if recipe.merge.dtype == "float32" else 2)
    return adapters + checkpoints + merged


# ---------------------------------------------------------------------------------------------- data-dependent


def check_schedule(recipe: Recipe, i: int, config, n_rows: int) -> list[str]:
    """At least one optimizer step at a learning rate above 0, computed as the Trainer computes it."""
    import torch
    from transformers import get_scheduler

    bs, ga = config.per_device_train_batch_size, config.gradient_accumulation_steps
    batches = math.ceil(n_rows / bs)
    per_epoch = max(batches // ga + int(batches % ga > 0), 1)
    steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
    st = recipe.stages[i]
    key = ("stages", i, "train", "max_steps" if st.train.max_steps > 0 else "epochs")
    if steps <= 0:
        return [f"{recipe.locate(*key)}: no optimizer step ({n_rows} rows, batch {bs} x {ga}); raise it"]
    if config.lr_scheduler_type == "reduce_lr_on_plateau":
        return []
    warmup = config.get_warmup_steps(steps)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=config.learning_rate)
    try:
        sched = get_scheduler(config.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=steps,
                              scheduler_specific_kwargs=config.lr_scheduler_kwargs or {})
    except Exception as e:
        return [f"{recipe.locate('stages', i, 'train', 'scheduler')}: transformers cannot build it: "
                f"{str(e).splitlines()[0]}"]
    for _ in range(min(steps, 5000)):
        if opt.param_groups[0]["lr"] > 0:
            return []
        opt.step()
        sched.step()
    return [f"{recipe.locate(*key)}: {steps} optimizer step{'s' if steps != 1 else ''} ({n_rows} rows, batch {bs} x "
            f"{ga}), every one at learning rate 0 ({warmup} warmup step{'s' if warmup != 1 else ''}); nothing would be "
            "learned: raise epochs or max_steps, or lower warmup_ratio"]


__all__ = ["Checked", "preflight"]
