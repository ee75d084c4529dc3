"""prefopt: one YAML recipe chains SFT into DPO, ORPO or SimPO on a 4-bit DoRA base.

    import prefopt
    result = prefopt.run("recipes/demo.yaml", overrides=["stages.dpo.beta=0.2"])
    result.adapters, result.metrics, result.passed, result.merged

Heavy libraries (torch, transformers, trl) load only when a function needs them.
"""

from .api import (
    Plan,
    disable_fast_dora,
    enable_fast_dora,
    evaluate,
    load_adapter,
    memory_plan,
    merge,
    plan,
    run,
    status,
    sweep,
    train_stage,
)
from .config import Recipe, load_recipe, recipe_from_dict
from .errors import DataError, GateFailed, PrefoptError, RecipeError
from .pipeline import RunResult
from .runs.status import RunStatus
from .sweep import SweepResult
from .version import __version__

__all__ = ["DataError", "GateFailed", "PrefoptError", "Recipe", "RecipeError", "RunResult", "RunStatus", "Plan",
           "load_recipe", "recipe_from_dict", "run", "plan", "memory_plan", "evaluate", "status", "merge",
           "load_adapter", "train_stage", "sweep", "SweepResult", "enable_fast_dora", "disable_fast_dora",
           "__version__"]
