"""ORPO stage: TRL's experimental ORPOTrainer (reference-free) continuing the running adapter."""

from __future__ import annotations

import os
from pathlib import Path

from .common import check_trainer_kwargs, make_trainer, train_and_save

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def check(stage, where: str) -> list[str]:
    from trl.experimental.orpo import ORPOConfig

    return check_trainer_kwargs(ORPOConfig, stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), **_) -> dict:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    method = {"beta": stage.beta, "max_length": stage.train.max_length}
    trainer = make_trainer(ORPOTrainer, ORPOConfig, model, tokenizer, stage, data, out_dir, method, seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    return train_and_save(trainer, out_dir, tokenizer)
