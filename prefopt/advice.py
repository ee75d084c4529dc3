"""What prefopt advises, with its thresholds written once: the method guidance on data size (shown by `prefopt plan`,
notes never errors) and the training diagnostics read from a finished stage's log (each with a suggestion).

Guidance (the method background, ../shared/background): rank 8 for small, narrow data (under about 500 examples),
16 as the default, 32 for large, diverse sets; 1-3 epochs, and under about 1,000 examples watch the held-out loss
after the first epoch and stop when it rises; 2e-4 with cosine decay is the LoRA/DoRA learning rate.
"""

from __future__ import annotations

from .config import EarlyStoppingSection

SMALL_DATA_ROWS = 500  # under this many training rows: r 8
FEW_ROWS_FOR_EPOCHS = 1000  # under this many: watch the held-out loss after epoch 1 (early stopping)
MAX_ADAPTER_LR = 5e-4  # above this, a LoRA/DoRA learning rate is far past the usual 2e-4


def plan_notes(recipe, data: list) -> list[str]:
    """Where the recipe departs from the guidance, given each stage's rows after the data step's filters: one line
    each, with the reason."""
    notes = []
    rows = [len(d.train) for d in data]
    largest = max(rows, default=0)
    r = recipe.adapter.r
    if largest and largest < SMALL_DATA_ROWS and r > 8:
        notes.append(f"adapter.r {r} with at most {largest} training rows in a stage: for small, narrow data (under "
                     f"about {SMALL_DATA_ROWS} examples) the guidance is r 8, which overfits less")
    for i, (st, n) in enumerate(zip(recipe.stages, rows)):
        tr = st.train
        stops = getattr(tr, "early_stopping", None) is not None
        if tr.max_steps <= 0 and tr.epochs > 1 and n < FEW_ROWS_FOR_EPOCHS and not stops:
            notes.append(f"stages[{i}] ({st.name}): {tr.epochs:g} epochs on {n} rows without early stopping: under "
                         f"about {FEW_ROWS_FOR_EPOCHS:,} examples, watch the held-out loss after the first epoch and "
                         "stop when it rises (train.early_stopping)")
        if tr.learning_rate > MAX_ADAPTER_LR:
            method = "DoRA" if recipe.adapter.method == "dora" else "LoRA"
            notes.append(f"stages[{i}] ({st.name}): learning_rate {tr.learning_rate:g} is above {MAX_ADAPTER_LR:g}; "
                         f"the usual {method} rate is 2e-4 with cosine decay (preference stages often lower), and a "
                         "rate this high tends to diverge")
    return notes


# ---------------------------------------------------------------------------------------------- early stopping

# the held-out metrics each stage type's TRL trainer logs (without the eval_ prefix), for train.early_stopping.metric
_PAIRED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")
EVAL_METRICS = {
    "sft": ("loss", "mean_token_accuracy", "entropy"),
    "dpo": (*_PAIRED, "entropy", "mean_token_accuracy"),
    "kto": ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected", "entropy"),
    "orpo": (*_PAIRED, "nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "simpo": (*_PAIRED, "nll_loss"),
}


def stage_metrics(stage) -> tuple[str, ...]:
    """The held-out metrics a stage logs: its type's, and a multi-loss DPO's parts (loss/<name>)."""
    parts = tuple(f"loss/{n}" for n in stage.losses()) if stage.type == "dpo" and len(stage.losses()) > 1 else ()
    return EVAL_METRICS.get(stage.type, ("loss",)) + parts


def early_stopping(stage, train_rows: int, has_eval: bool):
    """(the EarlyStoppingSection in force or None, why, in words). auto: on for an SFT stage with held-out rows and
    under FEW_ROWS_FOR_EPOCHS training rows."""
    es = stage.train.early_stopping
    if es is None:
        return None, "off (train.early_stopping: null)"
    if es == "auto":
        if stage.type == "sft" and has_eval and train_rows < FEW_ROWS_FOR_EPOCHS and stage.train.max_steps <= 0:
            return EarlyStoppingSection(), (f"on by default for {train_rows} training rows, under "
                                            f"{FEW_ROWS_FOR_EPOCHS:,} (off: train.early_stopping: null)")
        return None, "off (auto: only for SFT stages under 1,000 training rows with held-out rows)"
    return es, "on (train.early_stopping)"


def metric_key(metric: str) -> str:
    """The metric as the trainer's evaluation logs it: eval_<name>."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"
