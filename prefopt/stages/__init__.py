"""The stages. Each module reads top to bottom: build its TRL config, its trainer, train, save.
These are the only modules that import trl (besides prefopt._compat, for trl.experimental)."""

from . import dpo, orpo, sft, simpo

STAGES = {"sft": sft.run, "dpo": dpo.run, "orpo": orpo.run, "simpo": simpo.run}
CHECKS = {"sft": sft.check, "dpo": dpo.check, "orpo": orpo.check, "simpo": simpo.check}
CONFIGS = {"sft": sft.config_class, "dpo": dpo.config_class, "orpo": orpo.config_class, "simpo": simpo.config_class}
OPTIONS = {"sft": sft.options, "dpo": dpo.options, "orpo": orpo.options, "simpo": simpo.options}
