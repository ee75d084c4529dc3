"""ORPO stage: TRL's experimental ORPOTrainer (reference-free) continuing the running adapter."""

from __future__ import annotations

from pathlib import Path

from .. import _compat
from .common import check_trainer_kwargs, make_trainer, train_and_save


def config_class():
    return _compat.orpo_classes()[0]


def options(stage) -> dict:
    """ORPOConfig's method options from the stage section."""
    return {"beta": stage.beta, "max_length": stage.effective_max_length()}


def check(stage, where: str) -> list[str]:
    return check_trainer_kwargs(config_class(), stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), resume_from=None, **_) -> dict:
    ORPOConfig, ORPOTrainer = _compat.orpo_classes()
    trainer = make_trainer(ORPOTrainer, ORPOConfig, model, tokenizer, stage, data, out_dir, options(stage), seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    return train_and_save(trainer, out_dir, tokenizer, resume_from=resume_from)
