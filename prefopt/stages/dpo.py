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


def config_class():
    from trl import DPOConfig

    return DPOConfig


def options(stage) -> dict:
    """DPOConfig's method options from the stage section."""
    return {
        "beta": stage.beta,
        "loss_type": [stage.loss_type],
        "max_length": stage.effective_max_length(),
        # the reference log-probs are computed (or read from prefopt's cache) in run, after the reference is fixed
        "precompute_ref_log_probs": False,
    }


# DPOTrainer's loss types as of TRL 1.16 (our table, not its help text: tests/test_config.py checks it against the
# installed TRL, so an upgrade that adds or drops one fails there, not in a user's run)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def check(stage, where: str) -> list[str]:
    import difflib

    DPOConfig = config_class()
    problems = check_trainer_kwargs(DPOConfig, stage.trainer_kwargs, where)
    if stage.loss_type not in LOSS_TYPES:
        close = difflib.get_close_matches(stage.loss_type, LOSS_TYPES, n=1)
        hint = f"did you mean {close[0]}?" if close else f"one of {', '.join(LOSS_TYPES)}"
        problems.append(f"{where}.loss_type: unknown DPO loss '{stage.loss_type}'; {hint}")
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
    ref = reference_logps(trainer, ref_cache) if precompute else None
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


def _reference_pass(trainer, ds, batch_size: int) -> dict:
    """The reference's log-probs of every row: TRL's own per-batch computation (the "ref" adapter, or the base),
    over a data loader split across the processes and gathered back in order. Not TRL's _precompute_ref_logps, which
    goes through a datasets cache file that only the main process can find for an in-memory dataset, and hashes
    every weight of the model first."""
    import torch
    from torch.utils.data import DataLoader

    loader = trainer.accelerator.prepare(DataLoader(ds, batch_size=batch_size, collate_fn=trainer.data_collator,
                                                    shuffle=False, num_workers=0))
    model = trainer.ref_model or trainer.model
    chosen, rejected = [], []
    for batch in loader:
        c, r = trainer.compute_ref_log_probs(model, batch)
        c, r = trainer.accelerator.gather_for_metrics((c, r))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return {"ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}


def reference_logps(trainer, cache) -> dict:
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
            cols = _reference_pass(trainer, ds, bs)
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
