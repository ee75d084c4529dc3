"""SFT stage: TRL's SFTTrainer on chat (`messages`) or plain `text` rows, training the running adapter."""

from __future__ import annotations

from pathlib import Path

from .common import adapter_precision_kept, check_trainer_kwargs, make_config, train_and_save, training_args


def check(stage, where: str) -> list[str]:
    from trl import SFTConfig

    return check_trainer_kwargs(SFTConfig, stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), **_) -> dict:
    from trl import SFTConfig, SFTTrainer

    base = training_args(stage.train, output_dir=out_dir / "trainer", seed=seed, report_to=report_to,
                         run_name=run_name, has_eval=data.eval is not None)
    args = make_config(SFTConfig, base, {"max_length": stage.train.max_length, "packing": False},
                       stage.trainer_kwargs)
    with adapter_precision_kept(model):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    return train_and_save(trainer, out_dir, tokenizer)
