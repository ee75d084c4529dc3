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


def make_plan(recipe: Recipe) -> str:
    from .pipeline import adapter_note, preflight, stage_notes

    checked = preflight(recipe)
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
    if recipe.eval is not None:
        from .config import resolve_path

        mmlu_path = recipe.eval.mmlu and str(resolve_path(recipe.eval.mmlu.path, recipe._base_dir) or recipe.eval.mmlu.path)
        lines += ["# eval (before the merge)", f"    {eval_note(recipe.eval, mmlu_path)}"]
    return "\n".join(lines)


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
                                        g.min_reward_accuracy), ("min_task_delta", g.min_task_delta)) if v is not None]
    parts.append("gates: " + (", ".join(gates) if gates else "none"))
    return "; ".join(parts)
