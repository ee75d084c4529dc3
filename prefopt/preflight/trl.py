"""The stages' TRL configs, checked before a model loads: optimizer and scheduler names, trainer_kwargs' types,
each config built as the stage will build it, and the schedule it gives on the stage's rows."""

from __future__ import annotations

import math
import re
import tempfile
import typing
from dataclasses import fields

from ..config import Recipe
from ..stages import CONFIGS, OPTIONS
from ..stages.common import training_args

_FLOATISH = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


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
