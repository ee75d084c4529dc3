"""The recipe: its schema (every field, default and help text) and its loader.

`load_recipe(path, overrides)` returns a validated `Recipe` or raises `RecipeError` listing *every* problem at
once, each with its key path and YAML line. Nothing heavy is imported here, so `prefopt plan` and the CLI's error
paths stay fast.
"""

from .load import apply_overrides, check_paths, load_recipe, recipe_from_dict, validate_recipe
from .locate import DATA_SUFFIXES, fmt_path, looks_local, resolve_path
from .schema import (
                     PREFERENCE_TYPES,
                     REFERENCE_TYPES,
                     REWRITING_INITS,
                     STAGE_TYPES,
                     SWEEP_MAX_POINTS,
                     UNPAIRED_TYPES,
                     AdapterSection,
                     CompletionsSection,
                     DataSection,
                     DPOStage,
                     EarlyStoppingSection,
                     EvalSection,
                     GatesSection,
                     KTOStage,
                     MergeSection,
                     MMLUSection,
                     ModelSection,
                     ORPOStage,
                     QualitySection,
                     Recipe,
                     ReferenceFilterSection,
                     SFTStage,
                     SimPOStage,
                     SourceSection,
                     Stage,
                     SweepSection,
                     TrackingSection,
                     TrainSection,
                     WandbSection,
                     defaults,
                     identity,
)

__all__ = ["DATA_SUFFIXES", "PREFERENCE_TYPES", "REFERENCE_TYPES", "REWRITING_INITS", "STAGE_TYPES", "UNPAIRED_TYPES",
           "AdapterSection", "CompletionsSection", "DPOStage", "DataSection", "EarlyStoppingSection",
           "EvalSection", "GatesSection", "KTOStage", "MMLUSection", "MergeSection", "ModelSection",
           "ORPOStage", "QualitySection", "Recipe", "ReferenceFilterSection", "SFTStage", "SimPOStage",
           "SourceSection", "Stage", "SweepSection", "SWEEP_MAX_POINTS",
           "TrackingSection", "TrainSection", "WandbSection", "apply_overrides",
           "check_paths", "defaults", "fmt_path", "identity", "load_recipe", "looks_local",
           "recipe_from_dict", "resolve_path", "validate_recipe"]
