"""What a run needs around it, checked before a model loads: W&B, the evaluation's files, the completion prompts,
and the output folder (writable, with room for what the run will write)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import hub
from ..config import PREFERENCE_TYPES, UNPAIRED_TYPES, Recipe
from ..errors import option
from ..eval import mmlu
from ..memory import model_shape, recipe_memory_plan
from ..tracking import effective_mode, has_credentials
from .model import HUB_ID


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
        elif not HUB_ID.match(p) or p.startswith((".", "/", "~")):
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
    scored = [s for s in recipe.stages if s.type in PREFERENCE_TYPES + UNPAIRED_TYPES]
    for key, what in (("min_reward_accuracy", "a reward accuracy"), ("min_reward_margin", "a reward margin")):
        if getattr(g, key) is not None and not scored:
            problems.append(f"{recipe.locate('eval', 'gates', key)}: the recipe has no preference stage to measure "
                            f"{what} on")
    if g.min_reward_accuracy is not None and scored and scored[-1].type in UNPAIRED_TYPES:
        problems.append(f"{recipe.locate('eval', 'gates', 'min_reward_accuracy')}: the last preference stage "
                        f"'{scored[-1].name}' is a {scored[-1].type} stage: single answers, no pairs to score an "
                        "accuracy on; gate it with min_reward_margin or min_task_delta instead")
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
