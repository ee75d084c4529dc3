"""Every use of another library's private or experimental API, outside the DoRA kernel, in one file.

Each entry names the version it was written against and what would make it removable. An upgrade of TRL,
bitsandbytes, transformers, torch or accelerate is absorbed here (and, for PEFT's layer internals, in the one other
such module: `prefopt/dora/forward.py`, whose docstring lists its contract with PEFT's LoRA layer).
tests/test_architecture.py fails when such a use appears anywhere else.
"""

from __future__ import annotations

import os
import warnings

# ------------------------------------------------------------------------------------------ transformers


# PEFT 0.21 reads model.is_gradient_checkpointing, which transformers 5.25 deprecates (a FutureWarning per model
# load that the user can do nothing about); removable when PEFT reads is_activation_checkpointing
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def checkpointing_args(on: bool) -> dict:
    """TrainingArguments for activation checkpointing under the installed transformers' names: 5.x renamed
    `gradient_checkpointing*` to `activation_checkpointing*` and warns (FutureWarning) on the old names; removable
    when prefopt requires transformers>=5.25 (then always the new names)."""
    import dataclasses

    from transformers import TrainingArguments

    new = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


# --------------------------------------------------------------------------------------------------- TRL
# trl.experimental may change in any release, patch releases included (TRL's own words): pyproject pins trl<1.17.

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL 1.16 warns on every trl.experimental import


def orpo_classes():
    """(ORPOConfig, ORPOTrainer). Written for TRL 1.16, where ORPO lives in trl.experimental.orpo; removable when
    TRL promotes it to the top level (as it did KTO)."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def cpo_classes():
    """(CPOConfig, CPOTrainer), SimPO being CPO's loss_type="simpo". Written for TRL 1.16 (trl.experimental.cpo);
    removable when TRL promotes CPO to the top level."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOConfig, CPOTrainer


def use_precomputed_ref_logps(trainer) -> None:
    """Tell a built DPOTrainer that its datasets carry ref_chosen_logps / ref_rejected_logps (prefopt computes and
    caches them itself). TRL 1.16 decides at construction from args.precompute_ref_log_probs and keeps its own
    flag `trainer.precompute_ref_logps`; removable if TRL accepts precomputed columns at construction."""
    trainer.args.precompute_ref_log_probs = True
    trainer.precompute_ref_logps = True


class _LoggedWeight:
    """One entry of DPOTrainer.loss_weights that records the loss part it multiplies (see log_loss_parts). Not a
    float subclass: torch would take that as a plain number and never call __rmul__."""

    def __init__(self, value: float, name: str, sink):
        self.value, self.name, self.sink = float(value), name, sink

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def _record(self, other):
        import torch

        if isinstance(other, torch.Tensor) and other.numel() == 1:
            self.sink(self.name, other.detach())
            return other * self.value
        return other * self.value

    __rmul__ = __mul__ = _record


def log_loss_parts(trainer) -> None:
    """Log each part of a multi-loss DPO (loss_type [sigmoid, sft] ...) as `loss/<name>` (the part before its
    weight, averaged over the logging window) beside TRL's own metrics. TRL 1.16 sums
    `per_sequence_loss.mean() * loss_weight` over zip(self.loss_types, self.loss_weights) inside `_compute_loss` and
    logs only the total; each weight is replaced by an object that records the tensor it multiplies into the
    trainer's `_metrics[mode]` (TRL's per-window lists, averaged at each log). Removable when TRL logs the parts
    itself; tests/test_methods.py fails if the parts stop appearing."""
    names = list(trainer.loss_types)

    def sink(name, value):
        mode = "train" if trainer.model.training else "eval"
        trainer._metrics[mode][f"loss/{name}"].append(float(value))

    trainer.loss_weights = [_LoggedWeight(w, n, sink) for n, w in zip(names, trainer.loss_weights, strict=True)]


# --------------------------------------------------------------------------------------------------- bitsandbytes


def disable_cpu_repack(linear4bit) -> None:
    """bitsandbytes 0.48-0.50 repack a Linear4bit's weight into a CPU-only layout on its first eval/no-grad
    forward on CPUs with AVX512-BF16, after which `dequantize_4bit` is scrambled. The switch is the layer's
    attribute `support_avx512bf16_for_cpu`; removable when bitsandbytes keeps dequantization valid after the
    repack (or offers a public switch)."""
    linear4bit.support_avx512bf16_for_cpu = False


def is_cpu_packed(quant_state) -> bool:
    """Whether a 4-bit weight was already repacked for the CPU (bitsandbytes 0.48-0.50: `packing_format_for_cpu`
    on its quant state); such a weight cannot be dequantized by prefopt's shortcut. Removable with
    `disable_cpu_repack`."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def settle_4bit_compute_dtype(linear4bit, x):
    """The dtype a Linear4bit computes in for input x, settled as its own forward does (bitsandbytes 0.50:
    `fix_4bit_weight_quant_state_from_module`, `set_compute_type`, `compute_type_is_set`). Removable when
    bitsandbytes exposes the compute dtype publicly."""
    import bitsandbytes as bnb

    bnb.nn.modules.fix_4bit_weight_quant_state_from_module(linear4bit)
    if not linear4bit.compute_type_is_set:
        linear4bit.set_compute_type(x)
        linear4bit.compute_type_is_set = True
    return linear4bit.compute_dtype or x.dtype


# --------------------------------------------------------------------------------------------------- lm-eval


def lm_eval_mmlu_task_files() -> list:
    """lm-eval's MMLU task files, one per subject (lm-eval 0.4.x: tasks/mmlu/default/mmlu_<subject>.yaml inside the
    installed package; its file layout, not an API). Removable if lm-eval lists a group's tasks publicly without
    building them (TaskManager builds every task, which reads the datasets)."""
    from pathlib import Path

    import lm_eval

    return sorted((Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default").glob("mmlu_*.yaml"))


# --------------------------------------------------------------------------------------------------- PEFT
# (PEFT's LoRA layer internals, which the DoRA kernel reads on its hot path, are listed in prefopt/dora/forward.py)


def peft_dequantize(module):
    """A quantized layer's weight as a float tensor, by PEFT's helper for the quantizers it knows (PEFT 0.21:
    peft.utils.integrations.dequantize_module_weight, not exported at PEFT's top level). Used only for bases that
    are not bitsandbytes 4-bit or 8-bit (prefopt.quant.dequantize handles those itself). Removable if PEFT exports
    it (or a layer method) at its top level."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module)


# --------------------------------------------------------------------------------------------------- transformers


def zero3_enabled() -> bool:
    """Whether transformers holds a process-wide DeepSpeed ZeRO-3 config (transformers 5:
    transformers.integrations.deepspeed, an integration module, not the top-level API). Removable with
    `forget_zero3`."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def forget_zero3() -> None:
    """Drop that config, so the next from_pretrained loads whole (transformers 5: `unset_hf_deepspeed_config`).
    Removable if transformers scopes the config to the trainer that set it."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


# --------------------------------------------------------------------------------------------------- torch, accelerate


def in_backward() -> bool:
    """Inside a backward pass (gradient checkpointing's recomputation runs there). torch 2.4-2.13:
    `torch._C._current_graph_task_id()` is -1 outside one; removable if torch offers a public query."""
    import torch

    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def has_hooks(module) -> bool:
    """Whether a module has forward (pre-)hooks, torch's own (`_forward_hooks`, `_forward_pre_hooks`, no public
    accessor in torch 2.13) or accelerate's (`_hf_hook`, a plain attribute set by accelerate 1.x's add_hook_to_module).
    A hooked layer must be called, not read around: the hook may gather or move its weights. Removable if torch
    offers a public "has hooks" query and accelerate marks its hooked modules publicly."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module.__dict__.get("_hf_hook") is not None)
