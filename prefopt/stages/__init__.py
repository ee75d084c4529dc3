"""The stages. Each module reads top to bottom: build its TRL config, its trainer, train, save.
These are the only modules that import trl (besides prefopt._compat, for trl.experimental)."""

from . import dpo, kto, orpo, sft, simpo

STAGES = {"sft": sft.run, "dpo": dpo.run, "kto": kto.run, "orpo": orpo.run, "simpo": simpo.run}
CHECKS = {"sft": sft.check, "dpo": dpo.check, "kto": kto.check, "orpo": orpo.check, "simpo": simpo.check}
CONFIGS = {"sft": sft.config_class, "dpo": dpo.config_class, "kto": kto.config_class, "orpo": orpo.config_class,
           "simpo": simpo.config_class}
OPTIONS = {"sft": sft.options, "dpo": dpo.options, "kto": kto.options, "orpo": orpo.options, "simpo": simpo.options}


def ref_columns(stage) -> tuple[str, ...]:
    """The precomputed reference log-prob columns of a stage with a reference (DPO, KTO)."""
    return kto.ref_columns(stage) if stage.type == "kto" else dpo.REF_COLUMNS
