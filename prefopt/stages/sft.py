"""SFT stage: TRL's SFTTrainer on chat (`messages`) or plain `text` rows, training the running adapter.

Rows reach the trainer tokenized by prefopt.data.tokens, with the loss on the assistant turns only (train.loss_on:
assistant, the default) or on every token (all); TRL turns the mask into labels (-100 elsewhere) and truncates."""

from __future__ import annotations

from pathlib import Path

from ..data.tokens import encode_sft
from .common import check_trainer_kwargs, make_trainer, train_and_save


def config_class():
    from trl import SFTConfig

    return SFTConfig


def options(stage) -> dict:
    """SFTConfig's method options from the stage section."""
    return {"max_length": stage.effective_max_length(), "packing": False}


def check(stage, where: str) -> list[str]:
    return check_trainer_kwargs(config_class(), stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), resume_from=None, **_) -> dict:
    import dataclasses

    from trl import SFTConfig, SFTTrainer

    data = dataclasses.replace(data, train=tokenized(data.train, tokenizer, stage.train.loss_on),
                               eval=tokenized(data.eval, tokenizer, stage.train.loss_on))
    trainer = make_trainer(SFTTrainer, SFTConfig, model, tokenizer, stage, data, out_dir, options(stage), seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    return train_and_save(trainer, out_dir, tokenizer, resume_from=resume_from)


def tokenized(ds, tokenizer, loss_on: str):
    """{"input_ids", "assistant_masks"} rows: 1 marks a token the loss is taken on."""
    if ds is None:
        return None
    from datasets import Dataset

    return Dataset.from_list(encode_sft(ds.to_list(), tokenizer, loss_on))
