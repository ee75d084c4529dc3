"""DPO stage: TRL's DPOTrainer continuing the running adapter.

The reference, by construction:
- previous_stage (default): DPOTrainer, given a PeftModel and no ref_model, copies the adapter into a frozen
  "ref" adapter as the stage begins -- the SFT model, so at step 0 policy == reference (loss ln 2, margin 0).
- base: the "ref" copy is deleted, and TRL falls back to the model with adapters disabled.
With no stage before it, the adapter is fresh (B = 0), so both are the base.
"""

from __future__ import annotations

from pathlib import Path

from .. import _compat, dist
from .common import check_trainer_kwargs, make_trainer, train_and_save

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # what DPOTrainer.compute_ref_log_probs returns, in order


def config_class():
    from trl import DPOConfig

    return DPOConfig


def options(stage) -> dict:
    """DPOConfig's method options from the stage section."""
    return {
        "beta": stage.beta,
        "loss_type": stage.losses(),
        # (a wrong number of weights is check()'s problem, said once: not TRL's too)
        "loss_weights": stage.loss_weights if stage.loss_weights is None or
        len(stage.loss_weights) == len(stage.losses()) else None,
        "f_divergence_type": stage.f_divergence_type,
        "ld_alpha": stage.ld_alpha,
        "use_weighting": stage.use_weighting,
        "max_length": stage.effective_max_length(),
        # the reference log-probs are computed (or read from prefopt's cache) in run, after the reference is fixed
        "precompute_ref_log_probs": False,
    }


# DPOTrainer's choices as of TRL 1.16 -- prefopt's own table, not TRL's help text: tests/test_config.py reads the
# installed TRL's DPOTrainer code (tests/test_methods.py) and fails when an upgrade adds or drops one, not a user's run.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses built on the chosen-rejected reward difference: the only ones with an f-divergence generalisation
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
NO_WEIGHTING = ("aot", "aot_unpaired")  # WPO weighting would misalign with these losses' sorting


def _unknown(value: str, allowed, what: str, key: str) -> str:
    import difflib

    close = difflib.get_close_matches(value, allowed, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key}: unknown {what} '{value}'; {hint}one of {', '.join(allowed)}"


def check(stage, where: str) -> list[str]:
    DPOConfig = config_class()
    problems = check_trainer_kwargs(DPOConfig, stage.trainer_kwargs, where)
    multi = not isinstance(stage.loss_type, str)
    for j, name in enumerate(stage.losses()):
        if name not in LOSS_TYPES:
            problems.append(_unknown(name, LOSS_TYPES, "DPO loss", f"{where}.loss_type" + (f"[{j}]" if multi else "")))
        elif name in stage.losses()[:j]:
            problems.append(f"{where}.loss_type[{j}]: {name} is already in the list; give each loss once, with its "
                            "weight in loss_weights")
    if stage.loss_weights is not None and len(stage.loss_weights) != len(stage.losses()):
        problems.append(f"{where}.loss_weights: {len(stage.loss_weights)} weight(s) for {len(stage.losses())} "
                        f"loss(es) in loss_type {stage.losses()}; give one weight per loss, or none (1.0 each)")
    if stage.f_divergence_type not in F_DIVERGENCES:
        problems.append(_unknown(stage.f_divergence_type, F_DIVERGENCES, "f-divergence", f"{where}.f_divergence_type"))
    elif stage.f_divergence_type != "reverse_kl":
        other = [n for n in stage.losses() if n in LOSS_TYPES and n not in F_DIVERGENCE_LOSSES]
        if other:
            problems.append(f"{where}.f_divergence_type: {stage.f_divergence_type} is defined only for the losses "
                            f"built on the reward difference ({', '.join(F_DIVERGENCE_LOSSES)}), not "
                            f"{', '.join(other)}; use reverse_kl with them")
    if stage.use_weighting and any(n in NO_WEIGHTING for n in stage.losses()):
        problems.append(f"{where}.use_weighting: WPO weighting is not defined for {', '.join(NO_WEIGHTING)} (they "
                        "sort the pairs); turn it off or use another loss")
    if "exo_pair" in stage.losses() and not stage.trainer_kwargs.get("label_smoothing"):
        problems.append(f"{where}.loss_type: exo_pair needs trainer_kwargs.label_smoothing > 0 (the EXO paper "
                        "recommends 1e-3)")
    return problems


def run(model, tokenizer, stage, data, out_dir: Path, *, seed: int, report_to: list[str], run_name: str,
        callbacks=(), resume_from=None, ref_cache=None, echo=None, **_) -> dict:
    from trl import DPOConfig, DPOTrainer

    trainer = make_trainer(DPOTrainer, DPOConfig, model, tokenizer, stage, data, out_dir, options(stage), seed=seed,
                           report_to=report_to, run_name=run_name, callbacks=callbacks)
    if stage.reference == "base":
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in peft_model.peft_config:
            peft_model.delete_adapter("ref")
    if len(trainer.loss_types) > 1:
        _compat.log_loss_parts(trainer)
    return train_with_reference(trainer, stage, out_dir, tokenizer, resume_from=resume_from, ref_cache=ref_cache,
                                echo=echo)


def train_with_reference(trainer, stage, out_dir: Path, tokenizer, *, resume_from, ref_cache, echo,
                         columns=REF_COLUMNS) -> dict:
    """Train a stage with a reference (DPO, KTO): its log-probs precomputed once (or read from the cache) unless the
    setup makes that inexact, then train and save."""
    precompute, mismatch, impossible = stage.precompute_ref_log_probs, precision_mismatch(trainer), zero3(trainer)
    say = echo or print
    if precompute and impossible:
        precompute, mismatch = False, impossible
        say(f"prefopt: stage {stage.name}: reference computed live, every step: {impossible}")
    elif precompute and mismatch:
        if "precompute_ref_log_probs" in stage.model_fields_set:  # the recipe asked for it: done, and said
            say(f"prefopt: warning: stage {stage.name}: {mismatch}; precomputed as the recipe asks")
        else:
            precompute = False
            say(f"prefopt: stage {stage.name}: reference computed live, every step: {mismatch}")
    ref = reference_logps(trainer, ref_cache, columns) if precompute else None
    metrics = train_and_save(trainer, out_dir, tokenizer, resume_from=resume_from)
    if ref is not None:
        metrics["ref_logps"] = ref if not mismatch else {**ref, "warning": mismatch}
    elif stage.precompute_ref_log_probs:
        metrics["ref_logps"] = {"mode": "live", "why": mismatch}
    return metrics


def zero3(trainer) -> str | None:
    """Why the reference cannot be precomputed: under DeepSpeed ZeRO-3 TRL's reference forward gathers the weights
    the engine partitions, and before the engine wraps the model they are not DeepSpeed's yet (seen: 'Parameter'
    object has no attribute 'ds_status'). Live, the reference runs through the engine like the policy."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return "under DeepSpeed ZeRO-3 the reference runs through the engine's partitioned weights" \
        if _compat.zero3_enabled() else None


def precision_mismatch(trainer) -> str | None:
    """Why precomputed reference log-probs would not be the policy's numbers at step 0, or None.

    They are computed before the trainer wraps the model: on its float weights, under accelerate's autocast. That is
    the training forward's precision on one process and under DDP (autocast both), but not under FSDP's
    mixed-precision policy (every weight cast to bf16, no autocast) or DeepSpeed's bf16 engine (the weights
    themselves bf16), where step 0 would not have policy == reference (docs/scaling.md)."""
    kind = "FSDP" if getattr(trainer, "is_fsdp_enabled", False) else \
        "DeepSpeed" if getattr(trainer, "is_deepspeed_enabled", False) else None
    precision = getattr(trainer.args, "mixed_precision", "no") or "no"
    if kind == "DeepSpeed" and precision == "no":  # a DeepSpeed config file of the user's may set it itself
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        ds = getattr(plugin, "deepspeed_config", None) or {}
        precision = next((k for k in ("bf16", "fp16") if (ds.get(k) or {}).get("enabled") is True), "no")
    if kind is None or precision == "no":
        return None
    return (f"under {kind} with {precision} mixed precision the policy runs on {precision} weights, and a reference "
            "precomputed before the model is wrapped would not (at step 0 policy != reference)")


def _reference_pass(trainer, ds, batch_size: int, columns=REF_COLUMNS) -> dict:
    """The reference's log-probs of every row: TRL's own per-batch computation (the "ref" adapter, or the base),
    over a data loader split across the processes and gathered back in order. Not TRL's _precompute_ref_logps, which
    goes through a datasets cache file that only the main process can find for an in-memory dataset, and hashes
    every weight of the model first. `columns` names the trainer's two outputs (a None output is left out: KTO's KL
    log-probs under a loss without a KL term)."""
    import torch
    from torch.utils.data import DataLoader

    loader = trainer.accelerator.prepare(DataLoader(ds, batch_size=batch_size, collate_fn=trainer.data_collator,
                                                    shuffle=False, num_workers=0))
    model = trainer.ref_model or trainer.model
    parts: dict = {c: [] for c in columns}
    for batch in loader:
        named = [(c, o) for c, o in zip(columns, trainer.compute_ref_log_probs(model, batch)) if o is not None]
        gathered = trainer.accelerator.gather_for_metrics(tuple(o for _, o in named))
        for (c, _), o in zip(named, gathered):
            parts[c].append(o.float().cpu())
    return {c: torch.cat(v) for c, v in parts.items() if v}


def reference_logps(trainer, cache, columns=REF_COLUMNS) -> dict:
    """The reference's log-probs of every row, once, before training: read from prefopt's cache when its key (the
    reference, base, tokenizer, rows, max_length, ...) matches, else computed by TRL's precompute and stored.
    TRL's own cache is keyed on in-memory datasets' random fingerprints, so it never hits across runs."""
    import time

    from datasets import Dataset, concatenate_datasets

    _compat.use_precomputed_ref_logps(trainer)
    out = {"cache": "hit", "rows": 0, "seconds": 0.0}
    for split in ("train", "eval"):
        ds = getattr(trainer, f"{split}_dataset")
        if ds is None or isinstance(ds, dict):
            continue

        # read on the main process and shared, so every rank takes the same path (TRL's precompute is collective)
        cols = dist.broadcast(cache.load(split, len(ds)) if cache is not None and dist.is_main() else None)
        if cols is not None:
            ds = concatenate_datasets([ds, Dataset.from_dict({k: v.tolist() for k, v in cols.items()})], axis=1)
        else:
            t0 = time.perf_counter()
            bs = trainer.args.precompute_ref_batch_size or (trainer.args.per_device_train_batch_size if split ==
                                                            "train" else trainer.args.per_device_eval_batch_size)
            cols = _reference_pass(trainer, ds, bs, columns)
            ds = concatenate_datasets([ds, Dataset.from_dict({k: v.tolist() for k, v in cols.items()})], axis=1)
            out["seconds"] += time.perf_counter() - t0
            out["cache"] = "miss"
            if cache is not None and dist.is_main():
                cache.save(split, cols)
        setattr(trainer, f"{split}_dataset", ds)
        out["rows"] += len(ds)
    out["seconds"] = round(out["seconds"], 3)
    if cache is not None:
        out["key"] = cache.key
    return out
