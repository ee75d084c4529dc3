"""SimPO stage: TRL's experimental CPOTrainer with loss_type="simpo" (reference-free; cpo_alpha=0 unless set)."""

from __future__ import annotations

from pathlib import Path

from .. import _compat
from .common import check_trainer_kwargs, make_trainer, train_and_save


def config_class():
    return _compat.cpo_classes()[0]


def options(stage) -> dict:
    """CPOConfig's method options from the stage section (SimPO is CPO's loss_type="simpo")."""
    return {"loss_type": "simpo", "beta": stage.beta, "simpo_gamma": stage.gamma, "cpo_alpha": stage.cpo_alpha,
            "max_length": stage.effective_max_length()}


def check(stage, where: str) -> list[str]:
    return check_trainer_kwargs(config_class(), stage.trainer_kwargs, where)


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), resume_from=None, **_) -> dict:
    CPOConfig, CPOTrainer = _compat.cpo_classes()
    trainer = make_trainer(CPOTrainer, CPOConfig, model, tokenizer, stage, data, out_dir, options(stage), seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    return train_and_save(trainer, out_dir, tokenizer, resume_from=resume_from)
