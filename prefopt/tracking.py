"""Weights & Biases: one run per stage, grouped under the recipe run; a no-op when disabled.

transformers' WandbCallback picks up the run we open (it only calls wandb.init when none is active),
so the trainer's own logging lands in the stage's run. No API key is ever written by prefopt: wandb
reads it from its own login or WANDB_API_KEY, and offline runs need none.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def stage_run(wandb_cfg, *, run_dir: Path, group: str, name: str, job_type: str, config: dict):
    """Yields the trainer's `report_to` list and a function to log a summary dict."""
    if wandb_cfg.mode == "disabled":
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
        mode=wandb_cfg.mode,
        dir=str(run_dir),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
    )

    def log_summary(summary: dict) -> None:
        for section, values in summary.items():
            for k, v in (values or {}).items():
                if isinstance(v, (int, float)):
                    run.summary[f"final/{section}/{k}"] = v

    try:
        yield ["wandb"], log_summary
    finally:
        run.finish()
