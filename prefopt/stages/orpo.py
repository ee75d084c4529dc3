"""ORPO stage: TRL's experimental ORPOTrainer (reference-free) continuing the running adapter."""

from __future__ import annotations

import os
from pathlib import Path

from .common import check_trainer_kwargs, make_trainer, train_and_save

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def config_class():
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


def options(stage) -> dict:
    """ORPOConfig's method options from the stage section."""
    return {"beta": stage.beta, "max_length": stage.train.max_length}


def check(stage, where: str) -> list[str]:
    return check_trainer_kwargs(config_class(), stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), resume_from=None, **_) -> dict:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    trainer = make_trainer(ORPOTrainer, ORPOConfig, model, tokenizer, stage, data, out_dir, options(stage), seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    return train_and_save(trainer, out_dir, tokenizer, resume_from=resume_from)
