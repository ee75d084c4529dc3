"""ORPO stage: TRL's experimental ORPOTrainer (reference-free) continuing the running adapter."""

from __future__ import annotations

import os
from pathlib import Path

from .common import adapter_precision_kept, check_trainer_kwargs, make_config, train_and_save, training_args

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def check(stage, where: str) -> list[str]:
    from trl.experimental.orpo import ORPOConfig

    return check_trainer_kwargs(ORPOConfig, stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), **_) -> dict:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    base = training_args(stage.train, output_dir=out_dir / "trainer", seed=seed, report_to=report_to,
                         run_name=run_name, has_eval=data.eval is not None)
    args = make_config(ORPOConfig, base, {"beta": stage.beta, "max_length": stage.train.max_length},
                       stage.trainer_kwargs)
    with adapter_precision_kept(model):
        trainer = ORPOTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    return train_and_save(trainer, out_dir, tokenizer)
