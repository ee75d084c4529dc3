"""prefopt: one YAML recipe chains SFT into DPO, ORPO or SimPO on a 4-bit DoRA base.

    import prefopt
    recipe = prefopt.load_recipe("recipes/demo.yaml", overrides={"stages.1.beta": 0.2})
    result = prefopt.run(recipe)
    result.adapters, result.metrics

Heavy libraries (torch, transformers, trl) load only when a function needs them.
"""

from .api import disable_fast_dora, enable_fast_dora, merge, run, train_stage
from .config import Recipe, load_recipe, recipe_from_dict
from .errors import DataError, PrefoptError, RecipeError
from .version import __version__

__all__ = ["DataError", "PrefoptError", "Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "run",
           "merge", "train_stage", "enable_fast_dora", "disable_fast_dora", "__version__"]
