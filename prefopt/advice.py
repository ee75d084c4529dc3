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
    for i, (st, d, n) in enumerate(zip(recipe.stages, data, rows)):
        tr = st.train
        stops = early_stopping(st, n, d.eval is not None)[0] is not None  # auto: only SFT with held-out rows
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


# ---------------------------------------------------------------------------------------------- training diagnostics

CHOSEN_FALL_NATS = 1.0  # a preference stage's chosen (desirable) answers lost more log-prob than this, per answer
CHANCE_ACCURACY = 0.55  # a held-out reward accuracy at or below this after an epoch is chance (0.5)
OVERFIT_RISE = 0.02  # the held-out loss ended this fraction above its lowest evaluation after epoch 1
SFT_MIN_FALL = 0.01  # an SFT training loss that fell less than this fraction over the stage did not fall
MIN_LOGS = 4  # logged steps a trend needs
EXPLODE_FACTOR = 1000.0  # a gradient norm this many times its median so far is exploding


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h.get("step", 0), h[key]) for h in history if isinstance(h.get(key), (int, float))]


def diagnose(stage, history: list[dict], metrics: dict) -> list[dict]:
    """The symptoms a finished stage's log shows, each {name, what, suggestion}: preference answers losing
    log-prob while the margin grows, a held-out reward accuracy at chance after an epoch, a held-out loss rising
    after epoch 1, an SFT loss that did not fall. (Non-finite or exploding losses stop the stage while it trains:
    divergence().)"""
    out = []
    ev = metrics.get("eval") or {}
    epochs = max((h.get("epoch", 0) for h in history), default=0)
    beta = getattr(stage, "beta", None)
    if stage.type in ("dpo", "kto") and beta:
        chosen, margin = ev.get("eval_rewards/chosen"), ev.get("eval_rewards/margins")
        if isinstance(chosen, (int, float)) and isinstance(margin, (int, float)) and margin > 0 \
                and chosen / beta < -CHOSEN_FALL_NATS:
            answers, others = ("chosen", "rejected") if stage.type == "dpo" else ("desirable", "undesirable")
            out.append({"name": "chosen_logps_falling",
                        "what": f"the held-out {answers} answers lost {-chosen / beta:.2f} nats of log-prob against "
                                f"the reference while the margin rose to {margin:+.3f}: the model pushes both kinds of "
                                f"answer down, the {others} ones faster",
                        "suggestion": "add an SFT term (loss_type: [sigmoid, sft] with loss_weights) or lower the "
                                      "learning rate" if stage.type == "dpo" else
                                      "lower the learning rate, or raise desirable_weight"})
    acc = ev.get("eval_rewards/accuracies")
    if isinstance(acc, (int, float)) and epochs >= 1 and acc <= CHANCE_ACCURACY:
        out.append({"name": "reward_accuracy_at_chance",
                    "what": f"held-out reward accuracy {acc:.2f} after {epochs:g} epoch(s): chance is 0.50",
                    "suggestion": "read the review sample (is the chosen answer really the better one?), raise the "
                                  "learning rate or the epochs, or check that the reference is the one meant"})
    evals = _series(history, "eval_loss")
    if len(evals) >= 2:
        epoch_of = {h.get("step"): h.get("epoch", 0) for h in history if "eval_loss" in h}
        after = [(s, v) for s, v in evals if epoch_of.get(s, 0) >= 1 - 1e-9]
        low = min(after, key=lambda sv: sv[1]) if after else None
        last = evals[-1]
        if low is not None and last[0] > low[0] and last[1] > low[1] * (1 + OVERFIT_RISE):
            out.append({"name": "heldout_loss_rising",
                        "what": f"the held-out loss rose from {low[1]:.4f} (step {low[0]}) to {last[1]:.4f} (step "
                                f"{last[0]}): overfitting",
                        "suggestion": "fewer epochs, or train.early_stopping (it keeps the best checkpoint)"})
    if stage.type == "sft":
        losses = [v for _, v in _series(history, "loss")]
        if len(losses) >= MIN_LOGS:
            k = max(1, len(losses) // 4)
            first, last = _mean(losses[:k]), _mean(losses[-k:])
            if last > first * (1 - SFT_MIN_FALL):
                out.append({"name": "sft_loss_flat",
                            "what": f"the training loss did not fall ({first:.4f} -> {last:.4f} over "
                                    f"{history[-1].get('step', len(losses))} steps)",
                            "suggestion": "raise the learning rate, check the data (are the trained tokens the "
                                          "answers? see review_sample.md), or train longer"})
    return out


def divergence(history: list[dict]) -> str | None:
    """Why training must stop now, from the log so far: a loss or gradient norm that is NaN or infinite, or a
    gradient norm EXPLODE_FACTOR times its median so far. None while it is sound."""
    import math

    if not history:
        return None
    last = history[-1]
    for key in ("loss", "grad_norm"):
        v = last.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            return f"{key.replace('_', ' ')} is {v} at step {last.get('step')}"
    norms = [v for _, v in _series(history[:-1], "grad_norm")]
    g = last.get("grad_norm")
    if isinstance(g, (int, float)) and len(norms) >= MIN_LOGS - 1:
        median = sorted(norms)[len(norms) // 2]
        if median > 0 and g > EXPLODE_FACTOR * median:
            return (f"the gradient norm exploded at step {last.get('step')}: {g:.3g}, {g / median:,.0f} times its "
                    f"median so far ({median:.3g})")
    return None
