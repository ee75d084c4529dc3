"""What every stage module shares: TRL config arguments from the recipe's train section, the
trainer_kwargs check, and train -> evaluate -> save."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import time
from pathlib import Path

from .. import console, dist, signals
from .._compat import checkpointing_args
from ..advice import divergence, early_stopping, metric_key
from ..errors import PrefoptError, TrainingDiverged
from ..models import ADAPTER_NAME
from ..runs.folder import canonical_adapter_config, mark_checkpoint


def training_args(train, *, output_dir: str | Path, seed: int, report_to: list[str], run_name: str,
                  has_eval: bool, stopping=None) -> dict:
    """Keyword arguments common to SFTConfig / DPOConfig / KTOConfig / ORPOConfig / CPOConfig. `stopping`: the
    early stopping in force (advice.early_stopping), which evaluates and checkpoints together and keeps the best."""
    import torch

    on_gpu = torch.cuda.is_available()
    args = dict(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        **checkpointing_args(train.gradient_checkpointing),
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (prefopt stops the stage on it), not hidden
        eval_strategy="steps" if (has_eval and train.eval_steps) else "no",
        eval_steps=train.eval_steps,
        # checkpoints inside the stage (resume after a crash); the finished adapter prefopt writes itself, atomically
        **checkpoint_args(train.checkpoint_every),
        report_to=report_to,
        run_name=run_name,
        # TRL defaults to bf16 mixed precision; CPUs get plain fp32 autocast-free training.
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    if stopping is not None and has_eval:
        return {**args, **early_stopping_args(train, stopping)}
    return args


def early_stopping_args(train, stopping) -> dict:
    """Evaluate and checkpoint at every epoch (or every eval_steps), and load the best checkpoint at the end (the
    adapter the next stage starts from). transformers needs the two strategies equal; the best checkpoint is kept
    beside the last two; the early-stopping callback's counters are restored on resume."""
    every = {"eval_strategy": "steps", "eval_steps": train.eval_steps, "save_strategy": "steps",
             "save_steps": train.eval_steps} if train.eval_steps else {"eval_strategy": "epoch",
                                                                       "save_strategy": "epoch"}
    return {**every, "save_total_limit": 2, "save_only_model": False, "load_best_model_at_end": True,
            "metric_for_best_model": metric_key(stopping.metric), "greater_is_better": stopping.mode == "max",
            "restore_callback_states_from_checkpoint": True}


def early_stopping_callback(stopping):
    from transformers import EarlyStoppingCallback

    return EarlyStoppingCallback(early_stopping_patience=stopping.patience,
                                 early_stopping_threshold=stopping.min_delta)


def checkpoint_args(every) -> dict:
    """TrainingArguments for train.checkpoint_every: N steps, 'P%' of the stage's steps, or 'Mmin' of wall time
    (saved by checkpoint_callback). The last two checkpoints are kept: a kill while one is written leaves the other."""
    if every in (0, "0", "off", None):
        return {"save_strategy": "no"}
    base = {"save_total_limit": 2, "save_only_model": False}
    if isinstance(every, int):
        return {**base, "save_strategy": "steps", "save_steps": every}
    if every.endswith("%"):
        return {**base, "save_strategy": "steps", "save_steps": float(every[:-1]) / 100}
    return {**base, "save_strategy": "no"}  # minutes: checkpoint_callback asks for the saves


def minutes_of(every) -> float | None:
    return float(every[:-3]) if isinstance(every, str) and every.endswith("min") else None


def checkpoint_callback(minutes: float | None = None):
    """The callback every stage trains with: it marks each checkpoint complete once written (a kill mid-write leaves
    an unmarked one, never resumed from), saves by wall time when asked, stops gracefully on SIGTERM, and drops
    cached DoRA norms when a checkpoint's weights were loaded."""
    return _checkpoint_callback_class()(minutes)


@functools.cache
def _checkpoint_callback_class():
    from transformers import TrainerCallback  # (a heavy import: the class is made on first use)

    class CheckpointCallback(TrainerCallback):
        def __init__(self, minutes: float | None = None):
            self.minutes = minutes
            self.last = time.monotonic()
            self.diverged: str | None = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            from ..dora import clear_norm_cache  # (imports torch)

            signals.STATE["training"] = True
            if model is not None:
                clear_norm_cache(model)  # resume_from_checkpoint loads weights in place

        def on_step_end(self, args, state, control, **kw):
            due = dist.any_rank(self.minutes is not None and time.monotonic() - self.last >= self.minutes * 60)
            stop = dist.any_rank(signals.stop_requested())  # every rank stops (and saves) at the same step
            if due:
                control.should_save = True
            if stop:
                signals.STATE["stop"] = True
                control.should_save = args.save_strategy != "no" or self.minutes is not None
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kw):
            self.last = time.monotonic()
            dist.barrier()  # every rank has written its part (RNG state) before the checkpoint counts as complete
            if state.is_world_process_zero:
                mark_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kw):
            why = divergence(state.log_history)
            if why is not None:  # stop here, not train on: train_and_save says why
                self.diverged = why
                control.should_training_stop = True
                control.should_save = False
            return control

        def on_train_end(self, args, state, control, **kw):
            signals.STATE["training"] = False

    return CheckpointCallback


def check_trainer_kwargs(config_cls, kwargs: dict, where: str) -> list[str]:
    """trainer_kwargs must be fields of the TRL config; suggest the close match."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    problems = []
    for key in kwargs:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; not a field of trl's {config_cls.__name__}"
            problems.append(f"{where}.trainer_kwargs.{key}: unknown key{hint}")
    return problems


def make_config(config_cls, base: dict, method: dict, extra: dict):
    """TRL config from prefopt's arguments, the stage's method options and trainer_kwargs (last wins)."""
    try:
        return config_cls(**{**base, **method, **extra})
    except (ValueError, TypeError) as e:
        raise PrefoptError(f"{config_cls.__name__}: {e}") from None


@contextlib.contextmanager
def adapter_precision_kept(model):
    """Undo TRL's QLoRA cast of the trainable adapter to bf16 while the trainer is built.

    On a quantized base TRL rounds the *trainable* adapter to bf16 after DPOTrainer has copied it into
    the frozen fp32 "ref" adapter -- so at step 0 the policy is a rounded SFT model and no longer equals
    the reference (the chain's promise). fp32 adapter weights also keep small optimizer updates that bf16
    rounds away; compute still runs in bf16 under mixed precision on GPUs. The trainer builds its
    optimizer in train(), after this restores the exact fp32 tensors.
    """
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.is_floating_point()}
    yield
    for name, param in model.named_parameters():
        before = saved.get(name)
        if before is not None and param.dtype != before.dtype:
            param.data = before
    from ..dora.forward import clear_norm_cache

    clear_norm_cache(model)  # TRL filled DPO's "ref" copy with param.data.copy_, which no version counter sees


def make_trainer(trainer_cls, config_cls, model, tokenizer, stage, data, out_dir: Path, method: dict, *, seed: int,
                 report_to: list[str], run_name: str, callbacks=()):
    """The stage's TRL trainer on the running adapter: prefopt's common arguments, then the method's options,
    then the stage's trainer_kwargs (last wins)."""
    stopping, why = early_stopping(stage, len(data.train), data.eval is not None)
    base = training_args(stage.train, output_dir=out_dir / "trainer", seed=seed, report_to=report_to,
                         run_name=run_name, has_eval=data.eval is not None, stopping=stopping)
    if stopping is not None:
        every = f"every {stage.train.eval_steps} steps" if stage.train.eval_steps else "every epoch"
        console.say(f"prefopt: stage {stage.name}: early stopping on {metric_key(stopping.metric)} ({stopping.mode}, "
                    f"{every}, patience {stopping.patience}), the best checkpoint's adapter kept; {why}")
    progress = any(getattr(c, "replaces_tqdm", False) for c in callbacks)
    if progress:  # prefopt's own progress (stages/progress.py) instead of transformers' tqdm bar
        base["disable_tqdm"] = True
    for key in [k for k in stage.trainer_kwargs if k.startswith("gradient_checkpointing")]:
        base.pop(key.replace("gradient_", "activation_"), None)  # the old name in trainer_kwargs: it decides
    args = make_config(config_cls, base, method, stage.trainer_kwargs)
    callbacks = [*callbacks, checkpoint_callback(None if stopping else minutes_of(stage.train.checkpoint_every)),
                 *([early_stopping_callback(stopping)] if stopping else [])]
    with adapter_precision_kept(model):
        trainer = trainer_cls(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                              processing_class=tokenizer, callbacks=callbacks)
    if progress and console.run_log() is None:  # the raw log dicts: in the run's log file, not on a console
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    _checkpoints_hold_our_adapter_only(trainer)
    return trainer


def _checkpoints_hold_our_adapter_only(trainer) -> None:
    """Checkpoints save prefopt's adapter, not DPOTrainer's frozen "ref" copy (a resume rebuilds it from the stage
    the adapter started from, as the first attempt did)."""
    import functools

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config") and len(model.peft_config) > 1:
        model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=[ADAPTER_NAME])


def _finite(metrics: dict) -> dict:
    return {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in metrics.items()
            if isinstance(v, (int, float, str))}


def train_and_save(trainer, out_dir: Path, tokenizer, resume_from=None) -> dict:
    """Train (from a checkpoint when given), evaluate on held-out data if any, save the adapter (only ours, not
    TRL's "ref" copy)."""
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:  # a progress bar left up by an exception would hide the cursor and swallow the error's line
        for cb in trainer.callback_handler.callbacks:
            if getattr(cb, "replaces_tqdm", False):
                cb.close()
    if signals.stop_requested():
        raise signals.Terminated()
    diverged = next((cb.diverged for cb in trainer.callback_handler.callbacks if getattr(cb, "diverged", None)), None)
    if diverged:
        a = trainer.args
        raise TrainingDiverged(f"training stopped: {diverged}. Lower train.learning_rate (now {a.learning_rate:g}) "
                               f"or train.max_grad_norm (now {a.max_grad_norm:g}), and check the data (the review "
                               "sample); the stage's log so far is in its folder's trainer checkpoints and the run log")
    metrics = {"train": {**_finite(result.metrics), "steps": trainer.state.global_step}}
    if trainer.args.load_best_model_at_end:
        metrics["early_stopping"] = stopping_record(trainer)
    if resume_from:  # the trainer's train_loss averages this session's steps only: the whole stage's, from its log
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if logged:
            metrics["train"]["train_loss"] = sum(logged) / len(logged)
    if trainer.eval_dataset is not None:
        metrics["eval"] = _finite(trainer.evaluate())
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # under FSDP / ZeRO-3 each rank holds a shard of every weight: gathering them is a collective (every rank calls)
    state = gathered_adapter_state(model, deepspeed=getattr(trainer, "is_deepspeed_enabled", False)) if sharded \
        else None
    if trainer.is_world_process_zero():  # one writer under torchrun / accelerate launch
        model.save_pretrained(str(out_dir / "adapter"), selected_adapters=[ADAPTER_NAME], safe_serialization=True,
                              **({"state_dict": state} if state is not None else {}))
        canonical_adapter_config(out_dir / "adapter")
        tokenizer.save_pretrained(str(out_dir / "adapter"))
        (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return metrics


def stopping_record(trainer) -> dict:
    """What early stopping did: the metric, the best step and value (the adapter kept), and why training stopped."""
    st, args = trainer.state, trainer.args
    best = st.best_model_checkpoint
    best_step = int(Path(best).name.rsplit("-", 1)[1]) if best else None
    evals = [h for h in st.log_history if args.metric_for_best_model in h]
    early = st.global_step < st.max_steps
    return {"metric": args.metric_for_best_model, "mode": "max" if args.greater_is_better else "min",
            "best_step": best_step, "best_value": st.best_metric, "evaluations": len(evals),
            "stopped": "early" if early else "completed",
            "why": (f"{args.metric_for_best_model} did not improve for {trainer_patience(trainer)} evaluations; "
                    f"stopped at step {st.global_step} of {st.max_steps}") if early else
                   f"ran all {st.max_steps} steps",
            "adapter": f"step {best_step} (the best)" if best_step is not None else "the last step"}


def trainer_patience(trainer):
    from transformers import EarlyStoppingCallback

    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    return cb.early_stopping_patience if cb is not None else "?"


def gathered_adapter_state(model, *, deepspeed: bool = False) -> dict:
    """The adapters' weights (every "lora_" parameter), whole, on the CPU: FSDP2 holds each as a DTensor shard,
    DeepSpeed ZeRO-3 as a placeholder with its partition aside. A collective: every rank calls it, in the same order.
    (The trainer's own save_model writes a sharded checkpoint of the whole model, or nothing, not a PEFT adapter.)"""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        if deepspeed:
            import deepspeed as ds

            with ds.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in params}
        return {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().cpu().clone() for n, p in params}
