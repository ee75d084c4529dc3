"""prefopt: one YAML recipe chains SFT into DPO, ORPO or SimPO on a 4-bit DoRA base.

    import prefopt
    recipe = prefopt.load_recipe("recipes/demo.yaml", overrides={"stages.1.beta": 0.2})
    result = prefopt.run(recipe)
    result.adapters, result.metrics

Heavy libraries (torch, transformers, trl) load only when a function needs them.
"""

from .version import __version__
from .errors import DataError, PrefoptError, RecipeError
from .config import Recipe, load_recipe, recipe_from_dict


def run(recipe, **kwargs):
    """Run a recipe (see prefopt.pipeline.run)."""
    from .pipeline import run as _run

    return _run(recipe, **kwargs)


def merge(adapter_or_run_dir, out_dir=None, **kwargs):
    """Merge a run folder's final adapter, or an adapter folder, into its base (see prefopt.merge)."""
    from pathlib import Path

    from .merging.stream import merge_adapter, merge_run

    if (Path(adapter_or_run_dir) / "run.json").is_file():
        return merge_run(adapter_or_run_dir, out_dir, **kwargs)
    return merge_adapter(adapter_or_run_dir, out_dir, **kwargs)


def train_stage(stage, model, tokenizer, train_dataset, eval_dataset=None, *, output_dir, seed=42, report_to=()):
    """Run one stage on your own PeftModel and data (see prefopt.api.train_stage)."""
    from .api import train_stage as _train_stage

    return _train_stage(stage, model, tokenizer, train_dataset, eval_dataset, output_dir=output_dir, seed=seed,
                        report_to=report_to)


def enable_fast_dora(peft_model, dropout="lowrank"):
    """Route a PEFT model's DoRA layers through prefopt's exact low-rank forward (see prefopt.dora)."""
    from .dora.forward import enable_fast_dora as _enable

    return _enable(peft_model, dropout)


def disable_fast_dora(peft_model):
    """Give a PEFT model's DoRA layers back to PEFT's own forward."""
    from .dora.forward import disable_fast_dora as _disable

    return _disable(peft_model)


__all__ = ["DataError", "PrefoptError", "Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "run",
           "merge", "train_stage", "enable_fast_dora", "disable_fast_dora", "__version__"]
