"""`prefopt plan`: the resolved recipe, the stages, data sizes after the split, trainable parameters."""

from __future__ import annotations

from .config import Recipe


def trainable_parameters(recipe: Recipe) -> tuple[int, int]:
    """Adapter parameters vs all parameters, counted on a weightless (meta-device) copy of the base."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import adapter_config_from_section, count_trainable

    m = recipe.model
    cfg = AutoConfig.from_pretrained(recipe.model_path(), revision=m.revision, trust_remote_code=m.trust_remote_code)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(cfg, trust_remote_code=m.trust_remote_code)
    peft_model = get_peft_model(base, adapter_config_from_section(recipe.adapter))
    return count_trainable(peft_model)


def memory_plan(recipe: Recipe, *, gpu_memory: int | None = None, gpus: int = 1, device: str = "cuda",
                sharding: str = "none") -> dict:
    """Each stage's peak memory per device, by component (prefopt.memory), for the recipe's model and stages."""
    from .memory import memory_plan as plan_of, model_shape, stage_settings

    m = recipe.model
    try:
        shape = model_shape(recipe.model_path(), revision=m.revision, trust_remote_code=m.trust_remote_code)
    except OSError as e:
        from .errors import PrefoptError

        raise PrefoptError(f"model.name_or_path: cannot read the config of '{m.name_or_path}' for the memory plan: "
                           f"{str(e).splitlines()[0]}") from None
    return plan_of(shape, quantization=m.quantization, dtype=m.dtype, adapter=recipe.adapter,
                   stages=[stage_settings(st) for st in recipe.stages], gpu_memory=gpu_memory, gpus=gpus,
                   device=device, sharding=sharding)


def default_gpu_memory() -> int | None:
    """The first visible GPU's memory, when there is one (the budget `prefopt plan` checks without --gpu-memory)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def make_plan(recipe: Recipe, *, gpu_memory: int | None = None, gpus: int = 1, device: str = "cuda",
              sharding: str = "none", output_dir=None) -> tuple[str, dict | None]:
    """The plan as text, and the memory plan (None when it cannot be made)."""
    from .data.report import summary_lines
    from .pipeline import adapter_note, preflight, stage_notes

    checked = preflight(recipe, output_dir=output_dir)
    try:
        trainable, total = trainable_parameters(recipe)
        params = f"{trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.3f}%)"
    except Exception as e:  # e.g. a hub id that cannot be reached: still show the rest
        params = f"unknown ({str(e).splitlines()[0]})"
    lines = ["# resolved recipe", recipe.to_yaml().rstrip(), "", f"# {adapter_note(recipe)}", "",
             *[f"# warning: {w}" for w in checked.warnings], "# stages"]
    for i, (st, note) in enumerate(zip(recipe.stages, stage_notes(recipe))):
        data = checked.data[i]
        n_eval = len(data.eval) if data.eval is not None else 0
        lines.append(f"{i:02d}-{note}")
        lines.append(f"    data: {len(data.train)} train / {n_eval} eval rows ({data.fmt}); trainable params: {params}")
        lines += [f"    {line}" for line in summary_lines(data.report)]
    if recipe.eval is not None:
        from .config import resolve_path

        mmlu_path = recipe.eval.mmlu and str(resolve_path(recipe.eval.mmlu.path, recipe._base_dir) or recipe.eval.mmlu.path)
        lines += ["# eval (before the merge)", f"    {eval_note(recipe.eval, mmlu_path)}"]
    from .errors import PrefoptError
    from .memory import format_plan

    plan = None
    try:
        plan = memory_plan(recipe, gpu_memory=gpu_memory, gpus=gpus, device=device, sharding=sharding)
        lines += ["", *format_plan(plan)]
    except (PrefoptError, ValueError, ImportError) as e:  # a model class that will not build on meta tensors: the
        lines += ["", f"# memory plan: unknown ({str(e).splitlines()[0]})"]  # rest still stands
    return "\n".join(lines), plan


def eval_note(ev, mmlu_path: str | None) -> str:
    """One line: when the evaluation runs, on what, and its gates (mmlu_path: the MMLU path resolved)."""
    from .eval import mmlu

    parts = [f"after: {ev.after}"]
    if ev.mmlu is not None:
        if mmlu.is_local(mmlu_path):
            tests = mmlu.files_used(mmlu_path, 0)
            n = sum(mmlu.count_rows(f) for f in tests)
            what = f"{len(tests)} subjects, {n} test questions" + (f" (at most {ev.mmlu.limit} each)" if ev.mmlu.limit else "")
        else:
            what = "hub"
        parts.append(f"MMLU {ev.mmlu.path} ({what}, {ev.mmlu.num_fewshot}-shot), base vs tuned")
    parts.append(f"{ev.completions.n} completions side by side")
    g = ev.gates
    gates = [f"{k} {v:g}" for k, v in (("max_mmlu_drop", g.max_mmlu_drop), ("min_reward_accuracy",
                                        g.min_reward_accuracy), ("min_reward_margin", g.min_reward_margin),
                                        ("min_task_delta", g.min_task_delta)) if v is not None]
    parts.append("gates: " + (", ".join(gates) if gates else "none"))
    return "; ".join(parts)
