"""SimPO stage: TRL's experimental CPOTrainer with loss_type="simpo" (reference-free; cpo_alpha=0 unless set)."""

from __future__ import annotations

import os
from pathlib import Path

from .common import check_trainer_kwargs, make_trainer, train_and_save

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def check(stage, where: str) -> list[str]:
    from trl.experimental.cpo import CPOConfig

    return check_trainer_kwargs(CPOConfig, stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), **_) -> dict:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    method = {"loss_type": "simpo", "beta": stage.beta, "simpo_gamma": stage.gamma, "cpo_alpha": stage.cpo_alpha,
              "max_length": stage.train.max_length}
    trainer = make_trainer(CPOTrainer, CPOConfig, model, tokenizer, stage, data, out_dir, method, seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    return train_and_save(trainer, out_dir, tokenizer)
