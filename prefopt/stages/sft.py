"""SFT stage: TRL's SFTTrainer on chat (`messages`) or plain `text` rows, training the running adapter."""

from __future__ import annotations

from pathlib import Path

from .common import check_trainer_kwargs, make_trainer, train_and_save


def config_class():
    from trl import SFTConfig

    return SFTConfig


def options(stage) -> dict:
    """SFTConfig's method options from the stage section."""
    return {"max_length": stage.train.max_length, "packing": False}


def check(stage, where: str) -> list[str]:
    return check_trainer_kwargs(config_class(), stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), **_) -> dict:
    from trl import SFTConfig, SFTTrainer

    trainer = make_trainer(SFTTrainer, SFTConfig, model, tokenizer, stage, data, out_dir, options(stage), seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    return train_and_save(trainer, out_dir, tokenizer)
