"""KTO stage: TRL's KTOTrainer on single answers labelled desirable or not, continuing the running adapter.

The reference, as in the DPO stage (stages/dpo.py): previous_stage (default) is the frozen copy of the adapter that
KTOTrainer makes when given a PeftModel and no ref_model (the SFT model: at the first step the logged rewards and KL
are 0); base deletes that copy, so TRL falls back to the model with adapters disabled. Reference log-probs (and,
for loss_type kto, the KL completions' log-probs) are precomputed once through prefopt's cache, like DPO's.

The desirable / undesirable weights, unless the recipe sets them, balance the training rows' label counts: the
minority label's weight is raised until weight x rows is the same for both (KTO paper eq. 8: the ratio belongs in
[1, 4/3]; TRL warns outside it).
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import check_trainer_kwargs, make_trainer
from .dpo import train_with_reference

# KTOTrainer's loss types as of TRL 1.16 (prefopt's table; tests/test_methods.py checks it against the installed TRL)
LOSS_TYPES = ("kto", "apo_zero_unpaired")


def config_class():
    from trl import KTOConfig

    return KTOConfig


def ref_columns(stage) -> tuple[str, ...]:
    """The columns KTOTrainer reads precomputed reference log-probs from (no KL term under apo_zero_unpaired)."""
    return ("ref_logps",) if stage.loss_type == "apo_zero_unpaired" else ("ref_logps", "ref_KL_logps")


def label_counts(rows) -> tuple[int, int]:
    """(desirable, undesirable) rows of a dataset or list of rows."""
    labels = rows["label"] if hasattr(rows, "column_names") else [r["label"] for r in rows]
    good = sum(bool(x) for x in labels)
    return good, len(labels) - good


def balanced_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): 1.0 for the majority label, the minority's raised so weight x rows
    is equal, rounded (2 decimals, as TRL checks the range) so that the ratio stays inside [1, 4/3]."""
    if desirable == undesirable or not desirable or not undesirable:
        return 1.0, 1.0
    if desirable < undesirable:
        return math.ceil(undesirable / desirable * 100) / 100, 1.0
    return 1.0, math.floor(desirable / undesirable * 100) / 100


def weights(stage, train) -> tuple[float, float, str]:
    """The stage's weights and where they came from ('recipe', or 'balanced')."""
    good, bad = label_counts(train)
    if stage.desirable_weight is None and stage.undesirable_weight is None:
        d, u = balanced_weights(good, bad)
        return d, u, "balanced"
    return stage.desirable_weight or 1.0, stage.undesirable_weight or 1.0, "recipe"


def options(stage, train=None) -> dict:
    """KTOConfig's method options from the stage section (the weights need the training rows; without them, 1.0)."""
    d, u, _ = weights(stage, train) if train is not None else (stage.desirable_weight or 1.0,
                                                               stage.undesirable_weight or 1.0, "")
    return {
        "beta": stage.beta,
        "loss_type": stage.loss_type,
        "desirable_weight": d,
        "undesirable_weight": u,
        "max_length": stage.effective_max_length(),
        "precompute_ref_log_probs": False,  # prefopt computes (or reads) them in run, after the reference is fixed
    }


def check(stage, where: str) -> list[str]:
    problems = check_trainer_kwargs(config_class(), stage.trainer_kwargs, where)
    bs = stage.trainer_kwargs.get("per_device_train_batch_size", stage.train.batch_size)
    if stage.loss_type == "kto" and isinstance(bs, int) and bs < 2:
        problems.append(f"{where}.train.batch_size: loss_type kto estimates its KL term from the other answers in "
                        "the same batch, so it needs batch_size 2 or more (raise it, and lower grad_accum to keep the "
                        "effective batch), or use loss_type apo_zero_unpaired")
    return problems


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), resume_from=None, ref_cache=None, echo=None, **_) -> dict:
    from trl import KTOConfig, KTOTrainer

    say = echo or print
    d, u, source = weights(stage, data.train)
    good, bad = label_counts(data.train)
    say(f"prefopt: stage {stage.name}: {good} desirable, {bad} undesirable training rows; desirable_weight {d:g}, "
        f"undesirable_weight {u:g}" + (" (balanced: weight x rows equal for both labels" +
                                       (", inside TRL's recommended range)" if stage.loss_type == "kto" else ")")
                                       if source == "balanced" and good != bad else
                                       " (the recipe's)" if source == "recipe" else ""))
    trainer = make_trainer(KTOTrainer, KTOConfig, model, tokenizer, stage, data, out_dir, options(stage, data.train),
                           seed=seed, report_to=report_to, run_name=run_name, callbacks=callbacks)
    if stage.reference == "base":
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in peft_model.peft_config:
            peft_model.delete_adapter("ref")
    metrics = train_with_reference(trainer, stage, out_dir, tokenizer, resume_from=resume_from, ref_cache=ref_cache,
                                   echo=echo, columns=ref_columns(stage))
    metrics["labels"] = {"desirable": good, "undesirable": bad, "desirable_weight": d, "undesirable_weight": u,
                         "weights": source}
    return metrics
