"""`prefopt plan`: what a run will do -- the stages and their adapter and references, data sizes after the split,
trainable parameters, the evaluation, and each stage's memory -- before any weights load."""

from __future__ import annotations

from .advice import plan_notes
from .config import PREFERENCE_TYPES, REFERENCE_TYPES, Recipe
from .data.report import summary_lines
from .errors import PrefoptError
from .eval import mmlu
from .memory import format_plan, recipe_memory_plan
from .models import adapter_config_from_section, count_trainable, empty_model, load_config
from .preflight import preflight
from .version import __version__


def trainable_parameters(recipe: Recipe) -> tuple[int, int]:
    """Adapter parameters vs all parameters, counted on a weightless (meta-device) copy of the base."""
    from peft import get_peft_model

    m = recipe.model
    cfg = load_config(recipe.model_path(), revision=m.revision, trust_remote_code=m.trust_remote_code)
    base = empty_model(cfg, trust_remote_code=m.trust_remote_code)
    cfg = adapter_config_from_section(recipe.adapter)
    cfg.init_lora_weights = True  # the shapes only: no init runs on weightless layers (pissa would need an SVD)
    peft_model = get_peft_model(base, cfg)
    return count_trainable(peft_model)


def adapter_note(recipe: Recipe) -> str:
    """The one adapter every stage shares, and which DoRA forward trains it."""
    a = recipe.adapter
    note = f"adapter: {a.method} r={a.r} alpha={a.alpha:g} dropout={a.dropout:g}, shared by every stage"
    if a.init != "kaiming":
        note += {"gaussian": "; init gaussian (A normal, B zero)",
                 "eva": "; init eva (A from the first stage's rows, B zero)",
                 }.get(a.init, f"; init {a.init}: rewrites the base (W - s*B0*A0), rebuilt at every load and folded "
                               "into the merge")
    if a.method == "dora":
        drop = {"lowrank": "on the low-rank branch only", "full": "on the whole layer input (PEFT's semantics)"}
        note += (f"; {'fast low-rank' if a.dora_impl == 'fast' else 'PEFT'} DoRA forward"
                 + (f", dropout {drop[a.dora_dropout]}" if a.dropout > 0 else ""))
    return note


def stage_notes(recipe: Recipe) -> list[str]:
    """What the chain will do about adapters and references, said at start-up."""
    notes = []
    for i, st in enumerate(recipe.stages):
        prev = recipe.stages[i - 1].name if i else None
        start = f"continues the adapter from '{prev}'" if prev else "starts a fresh adapter"
        if st.type in REFERENCE_TYPES:
            if prev is None:
                ref = "reference: the base model (no stage before it)"
            elif st.reference == "base":
                ref = (f"reference: the BASE model (adapter disabled), not '{prev}', because reference: base was "
                       "asked for")
            else:
                ref = f"reference: a frozen copy of the adapter from '{prev}'"
            if st.precompute_ref_log_probs:
                ref += ", log-probs precomputed"
        elif st.type in PREFERENCE_TYPES:
            ref = "reference-free"
        else:
            ref = ""
        notes.append(f"{st.name} ({st.type}): {start}" + (f"; {ref}" if ref else ""))
    return notes


def header_lines(recipe: Recipe, run_dir) -> list[str]:
    """What `prefopt run` says first: recipe, base and quantization, adapter, stages, run folder, device."""
    import torch

    m = recipe.model
    src = f" ({recipe.source})" if getattr(recipe, "source", None) else ""
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}" + (f" (x{torch.cuda.device_count()})"
                                                              if torch.cuda.device_count() > 1 else "")
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    stages = stage_notes(recipe)
    return [f"prefopt {__version__}: recipe {recipe.name}{src}",
            f"  base     {m.name_or_path} ({m.quantization}, {m.dtype})",
            f"  {adapter_note(recipe).replace('adapter: ', 'adapter  ', 1)}",
            *[f"  {'stages' if i == 0 else '':<8} {i + 1}. {line}" for i, line in enumerate(stages)],
            f"  run      {run_dir}",
            f"  device   {device}",
            *(["  sweep    the recipe's sweep: section is for `prefopt sweep`; this run uses the values as written"]
              if recipe.sweep is not None else [])]


def default_gpu_memory() -> int | None:
    """The first visible GPU's memory, when there is one (the budget `prefopt plan` checks without --gpu-memory)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def make_plan(recipe: Recipe, *, gpu_memory: int | None = None, gpus: int = 1, device: str = "cuda",
              sharding: str = "none", output_dir=None, show_recipe: bool = False) -> tuple[str, dict | None]:
    """The plan as text -- stages and data sizes, memory plan, notes, then (show_recipe) the resolved recipe --
    and the memory plan (None when it cannot be made)."""
    checked = preflight(recipe, output_dir=output_dir)
    try:
        trainable, total = trainable_parameters(recipe)
        params = f"{trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.3f}%)"
    except Exception as e:  # e.g. a hub id that cannot be reached: still show the rest
        params = f"unknown ({str(e).splitlines()[0]})"
    m = recipe.model
    lines = [f"plan for recipe {recipe.name}: {len(recipe.stages)} stage(s) on {m.name_or_path} "
             f"({m.quantization}, {m.dtype})", f"# {adapter_note(recipe)}; trainable params: {params}", "# stages"]
    for i, note in enumerate(stage_notes(recipe)):
        data = checked.data[i]
        n_eval = len(data.eval) if data.eval is not None else 0
        lines.append(f"{i:02d}-{note}")
        lines.append(f"    data: {len(data.train)} train / {n_eval} eval rows ({data.fmt})")
        lines += [f"    {line}" for line in summary_lines(data.report)]
    if recipe.eval is not None:
        mmlu_path = recipe.eval.mmlu and str(recipe.resolve(recipe.eval.mmlu.path) or recipe.eval.mmlu.path)
        lines += ["# eval (before the merge)", f"    {eval_note(recipe.eval, mmlu_path)}"]
    plan = None
    try:
        plan = recipe_memory_plan(recipe, gpu_memory=gpu_memory, gpus=gpus, device=device, sharding=sharding)
        lines += ["", *format_plan(plan)]
    except (PrefoptError, ValueError, ImportError) as e:  # a model class that will not build on meta tensors: the
        lines += ["", f"# memory plan: unknown ({str(e).splitlines()[0]})"]  # rest still stands
    zero_rows = zero_rows_line(recipe)
    notes = [f"# note: {w}" for w in [*checked.warnings, *([zero_rows] if zero_rows else []),
                                      *plan_notes(recipe, checked.data)]]
    lines += ["", *notes] if notes else []
    if show_recipe:
        lines += ["", "# resolved recipe", recipe.to_yaml().rstrip()]
    else:
        lines += ["", "(the resolved recipe, every default filled in: --show-recipe)"]
    return "\n".join(lines), plan


SCAN_LIMIT = 32 * 2**30  # bytes of local weights `prefopt plan` reads for zero rows (beyond: the run counts them)


def zero_rows_line(recipe: Recipe) -> str | None:
    """DoRA: base rows of norm 0 in a local model's adapted weights, read from its safetensors (no model built;
    PEFT's DoRA would give NaN on them, prefopt holds their scale at 0). Models over SCAN_LIMIT are not read here:
    the run counts the rows when it attaches the adapter."""
    from pathlib import Path

    folder = Path(recipe.model_path())
    if recipe.adapter.method != "dora" or not folder.is_dir():
        return None
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    if size > SCAN_LIMIT:
        return (f"DoRA: base rows of norm 0 not looked for here ({size / 2**30:.0f} GiB of weights); the run counts "
                "them when it attaches the adapter")
    from peft import get_peft_model

    from .dora import zero_rows_in_checkpoint, zero_rows_note  # (imports torch)
    from .dora.zero_rows import module_names

    m = recipe.model
    base = empty_model(load_config(str(folder), revision=m.revision, trust_remote_code=m.trust_remote_code),
                       trust_remote_code=m.trust_remote_code)
    cfg = adapter_config_from_section(recipe.adapter)
    cfg.init_lora_weights = True  # the names only
    return zero_rows_note(zero_rows_in_checkpoint(str(folder), module_names(get_peft_model(base, cfg))))


def eval_note(ev, mmlu_path: str | None) -> str:
    """One line: when the evaluation runs, on what, and its gates (mmlu_path: the MMLU path resolved)."""
    parts = [f"after: {ev.after}"]
    if ev.mmlu is not None:
        if mmlu.is_local(mmlu_path):
            tests = mmlu.files_used(mmlu_path, 0)
            n = sum(mmlu.count_rows(f) for f in tests)
            what = f"{len(tests)} subjects, {n} test questions" + (
                f" (at most {ev.mmlu.limit} each)" if ev.mmlu.limit else "")
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
