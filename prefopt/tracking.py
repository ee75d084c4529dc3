"""Weights & Biases: one run per stage, grouped under the recipe run; a no-op when disabled.

transformers' WandbCallback picks up the run we open (it only calls wandb.init when none is active),
so the trainer's own logging lands in the stage's run. No API key is ever written by prefopt: wandb
reads it from its own login or WANDB_API_KEY, and offline runs need none.

Precedence: WANDB_MODE in the environment (online, offline, disabled; wandb's dryrun = offline, run = online)
overrides the recipe's tracking.wandb.mode; WANDB_DISABLED=true means disabled.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .dist import is_main

_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def effective_mode(recipe_mode: str) -> tuple[str, str]:
    """(mode, "env" | "recipe"): the environment's WANDB_MODE wins over the recipe."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "env"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in _ENV_MODES:
        return _ENV_MODES[env], "env"
    return recipe_mode, "recipe"


def has_credentials() -> bool:
    """An API key wandb would find: WANDB_API_KEY, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    for name in filter(None, [os.environ.get("NETRC"), str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]):
        try:
            if netrc.netrc(name).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


@contextlib.contextmanager
def stage_run(wandb_cfg, *, run_dir: Path, group: str, name: str, job_type: str, config: dict):
    """Yields the trainer's `report_to` list and a function to log a summary dict.

    The W&B run ends with exit code 0 only when the stage finished; an exception or interrupt inside the
    stage is recorded with a non-zero exit code (1, or 130 for an interrupt) before it propagates."""

    mode, _ = effective_mode(wandb_cfg.mode)
    if mode == "disabled" or not is_main():  # under torchrun, one W&B run per stage: the main process's
        yield [], (lambda summary: None)
        return
    import wandb

    run = wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=group,
        name=name,
        job_type=job_type,
        config=config,
        tags=list(wandb_cfg.tags) or None,
        mode=mode,
        dir=str(run_dir),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
    )

    def log_summary(summary: dict) -> None:
        for section, values in summary.items():
            for k, v in (values or {}).items():
                if isinstance(v, (int, float)):
                    run.summary[f"final/{section}/{k}"] = v

    exit_code = 1
    try:
        yield ["wandb"], log_summary
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130
        run.summary["prefopt/status"] = "interrupted"
        raise
    except BaseException:
        run.summary["prefopt/status"] = "failed"
        raise
    finally:
        run.finish(exit_code=exit_code)


def log_eval(wandb_cfg, *, run_dir: Path, group: str, name: str, log: dict, completions: list[dict]) -> None:
    """The evaluation as its own W&B run in the recipe's group: the figures in the summary, the completions as a
    table (prompt, base, tuned)."""
    mode, _ = effective_mode(wandb_cfg.mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=group, name=name, job_type="eval",
                     tags=list(wandb_cfg.tags) or None, mode=mode, dir=str(run_dir), reinit="finish_previous",
                     settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True))
    try:
        m = log.get("mmlu") or {}
        if m:
            run.summary.update({"mmlu/base_acc": m["base"]["acc"], "mmlu/tuned_acc": m["tuned"]["acc"],
                                "mmlu/delta_points": m["delta_points"], "mmlu/paired_stderr": m["paired_stderr"]})
        for stage, values in (log.get("heldout") or {}).items():
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    run.summary[f"heldout/{stage}/{k}"] = v
        run.summary["eval/passed"] = bool(log.get("passed"))
        if completions:
            table = wandb.Table(columns=["index", "prompt", "base", "tuned"],
                                data=[[c["index"], c["prompt"], c["base"], c["tuned"]] for c in completions])
            run.log({"completions": table})
    finally:
        run.finish()
