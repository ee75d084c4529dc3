"""DPO stage: TRL's DPOTrainer continuing the running adapter.

The reference, by construction:
- previous_stage (default): DPOTrainer, given a PeftModel and no ref_model, copies the adapter into a frozen
  "ref" adapter as the stage begins -- the SFT model, so at step 0 policy == reference (loss ln 2, margin 0).
- base: the "ref" copy is deleted, and TRL falls back to the model with adapters disabled.
With no stage before it, the adapter is fresh (B = 0), so both are the base.
"""

from __future__ import annotations

from pathlib import Path

from .common import check_trainer_kwargs, make_trainer, train_and_save


def config_class():
    from trl import DPOConfig

    return DPOConfig


def options(stage) -> dict:
    """DPOConfig's method options from the stage section."""
    return {
        "beta": stage.beta,
        "loss_type": [stage.loss_type],
        "max_length": stage.train.max_length,
        # With a base reference we drop TRL's "ref" adapter first, then precompute (in run).
        "precompute_ref_log_probs": stage.precompute_ref_log_probs and stage.reference != "base",
    }


def check(stage, where: str) -> list[str]:
    DPOConfig = config_class()
    problems = check_trainer_kwargs(DPOConfig, stage.trainer_kwargs, where)
    known = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    if f"'{stage.loss_type}'" not in known:
        problems.append(f"{where}.loss_type: unknown DPO loss '{stage.loss_type}'; see trl.DPOConfig.loss_type")
    return problems


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), resume_from=None, **_) -> dict:
    from trl import DPOConfig, DPOTrainer

    use_base_ref = stage.reference == "base"
    trainer = make_trainer(DPOTrainer, DPOConfig, model, tokenizer, stage, data, out_dir, options(stage), seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    if use_base_ref:
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in peft_model.peft_config:
            peft_model.delete_adapter("ref")
        if stage.precompute_ref_log_probs:
            _precompute_now(trainer)
    return train_and_save(trainer, out_dir, tokenizer, resume_from=resume_from)


def _precompute_now(trainer) -> None:
    """What DPOTrainer.__init__ does for precompute_ref_log_probs, run after the reference is fixed."""
    from trl.trainer.utils import hash_module

    trainer.args.precompute_ref_log_probs = True
    trainer.precompute_ref_logps = True
    trainer._precompute_model_hash = hash_module(trainer.model)
    bs = trainer.args.precompute_ref_batch_size
    trainer.train_dataset = trainer._precompute_ref_logps(
        trainer.train_dataset, "train", bs or trainer.args.per_device_train_batch_size)
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = trainer._precompute_ref_logps(
            trainer.eval_dataset, "eval", bs or trainer.args.per_device_eval_batch_size)
