"""Load the base model (4-bit NF4 / 8-bit / unquantized), the tokenizer, and the ONE adapter config.

`load_model(spec, ...)` is the one way prefopt loads base + tokenizer + adapter: training, the data step's reference
filter and the evaluation all call it. `empty_model` builds a weightless (meta-device) model from a config, for
everything that only needs the model's shape. Components take the values they need, not the Recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import _compat
from .config import AdapterSection, ModelSection, defaults
from .errors import PrefoptError
from .quant import harden_4bit_layers, nf4_settings, quantization_config, torch_dtype
from .runs.folder import model_identity

_MODEL = defaults(ModelSection)  # the schema's defaults, written there once
_ADAPTER = defaults(AdapterSection)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BASE_INFO = "prefopt_base.json"  # beside each saved adapter: how its base was loaded in training
ADAPTER_NAME = "default"  # PEFT's own default; never "train" (clashes with nn.Module.train)


def load_base_model(
    name_or_path: str,
    *,
    quantization: str = _MODEL["quantization"],
    dtype: str = _MODEL["dtype"],
    revision: str | None = None,
    trust_remote_code: bool = False,
    quant_storage: str = _MODEL["quant_storage"],
):
    """The frozen base, ready for an adapter. Loads safetensors only (never pickle)."""
    import torch
    from transformers import AutoModelForCausalLM

    whole_weights_on_load()
    qcfg = quantization_config(quantization, dtype, quant_storage)
    kwargs = dict(
        dtype=torch_dtype(dtype),
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        # each rank its own GPU under torchrun / accelerate launch (LOCAL_RANK), not every rank on GPU 0
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))} \
            if torch.cuda.is_available() else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise PrefoptError(
            f"model.name_or_path: cannot load '{name_or_path}': {str(e).splitlines()[0]}. "
            "Give a local folder with config.json and *.safetensors, or a hub id you can reach."
        ) from None
    if qcfg is None and torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}")
    harden_4bit_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def load_tokenizer(name_or_path: str, *, chat_template: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template == "chatml" or (chat_template is None and not tok.chat_template):
        tok.chat_template = CHATML_TEMPLATE
    elif chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_lora_config(
    *,
    r: int = _ADAPTER["r"],
    alpha: float = _ADAPTER["alpha"],
    dropout: float = _ADAPTER["dropout"],
    target_modules: str | list[str] = _ADAPTER["target_modules"],
    use_dora: bool = _ADAPTER["method"] == "dora",
    use_rslora: bool = _ADAPTER["use_rslora"],
):
    """The one PEFT adapter config every stage shares."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_dora=use_dora,
        use_rslora=use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_config_from_section(adapter) -> object:
    """LoraConfig from the recipe's adapter section (a thin mapping; keeps call sites explicit)."""
    return build_lora_config(
        r=adapter.r,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.use_rslora,
    )


def _same_adapter(saved, wanted) -> list[str]:
    diffs = []
    for key in ("r", "lora_alpha", "use_dora", "use_rslora"):
        if getattr(saved, key) != getattr(wanted, key):
            diffs.append(f"{key}: saved {getattr(saved, key)!r}, recipe {getattr(wanted, key)!r}")
    return diffs


def whole_weights_on_load() -> None:
    """Every model prefopt loads is loaded whole, on every process; under DeepSpeed ZeRO-3 the trainer partitions it.

    A DeepSpeed trainer leaves transformers a process-wide ZeRO-3 config, and from then on every from_pretrained /
    from_config builds a partitioned model (zero.Init): the stage after the first would load differently from the
    first, and the merge -- one process, after training, while the others wait -- would hang in zero.Init's
    collectives (seen: 'Cannot copy out of meta tensor'). A trainer sets it again when it is built."""
    if _compat.zero3_enabled():
        _compat.forget_zero3()


def attach_adapter(model, lora_config, *, init_from: str | Path | None = None, trainable: bool = True,
                   dora_impl: str = _ADAPTER["dora_impl"], dora_dropout: str = _ADAPTER["dora_dropout"]):
    """Wrap the base with the running adapter: a fresh one, or the previous stage's (same config, same weights).

    DoRA adapters take prefopt's exact low-rank forward unless dora_impl="peft" (see prefopt.dora).
    """
    from peft import PeftConfig, PeftModel, get_peft_model

    if init_from is None:
        return _with_dora_impl(get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME), lora_config,
                               dora_impl, dora_dropout)
    saved = PeftConfig.from_pretrained(str(init_from))
    diffs = _same_adapter(saved, lora_config)
    if diffs:
        raise PrefoptError(
            f"adapter in {init_from} does not match the recipe's adapter section ({'; '.join(diffs)}); "
            "the chain shares one adapter config: re-run with --fresh or restore the adapter section"
        )
    peft_model = PeftModel.from_pretrained(model, str(init_from), adapter_name=ADAPTER_NAME, is_trainable=trainable)
    harden_4bit_layers(peft_model)
    return _with_dora_impl(peft_model, lora_config, dora_impl, dora_dropout)


def _with_dora_impl(peft_model, lora_config, dora_impl: str, dora_dropout: str):
    if dora_impl not in ("fast", "peft"):
        raise ValueError(f"dora_impl must be 'fast' or 'peft', got {dora_impl!r}")
    if lora_config.use_dora and dora_impl == "fast":
        from .dora import enable_fast_dora  # (imports torch: a heavy import, kept out of `prefopt --help`)

        enable_fast_dora(peft_model, dora_dropout)
    return peft_model


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def base_info(model, *, name_or_path: str, quantization: str, dtype: str) -> dict:
    """How the training base was loaded, read off the live model, so a merge can replay the same round trip."""
    info = {"name_or_path": name_or_path, "quantization": quantization, "dtype": dtype}
    settings = nf4_settings(model) if quantization == "nf4" else None
    if settings is not None:
        info["bnb"] = settings
    return info


@dataclass(frozen=True)
class ModelSpec:
    """How the base is loaded and which DoRA forward its adapter takes: the recipe's model and adapter sections,
    resolved (a local model path made absolute)."""

    name_or_path: str
    quantization: str = _MODEL["quantization"]
    dtype: str = _MODEL["dtype"]
    revision: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    quant_storage: str = _MODEL["quant_storage"]
    dora_impl: str = _ADAPTER["dora_impl"]
    dora_dropout: str = _ADAPTER["dora_dropout"]

    @classmethod
    def of(cls, recipe) -> ModelSpec:
        m, a = recipe.model, recipe.adapter
        return cls(recipe.model_path(), m.quantization, m.dtype, m.revision, m.trust_remote_code, m.chat_template,
                   m.quant_storage, a.dora_impl, a.dora_dropout)

    def identity(self) -> dict:
        """What the base's numbers depend on (a cache key part): not where it was read from, if local."""
        return model_identity({"name_or_path": self.name_or_path, "quantization": self.quantization,
                               "dtype": self.dtype, "revision": self.revision})


def load_model(spec: ModelSpec, lora_config=None, *, adapter: str | Path | None = None, trainable: bool = True):
    """The base, the tokenizer, and the adapter on the base: `(base, model, tokenizer)`.

    `adapter` continues a saved adapter (None: a fresh one from `lora_config`); with `lora_config` None the saved
    adapter's own config is used. An inference model (`trainable=False`) is put in eval mode."""
    base = load_base_model(spec.name_or_path, quantization=spec.quantization, dtype=spec.dtype, revision=spec.revision,
                           trust_remote_code=spec.trust_remote_code, quant_storage=spec.quant_storage)
    tokenizer = load_tokenizer(spec.name_or_path, chat_template=spec.chat_template, revision=spec.revision,
                               trust_remote_code=spec.trust_remote_code)
    if lora_config is None:
        from peft import PeftConfig

        lora_config = PeftConfig.from_pretrained(str(adapter))
    model = attach_adapter(base, lora_config, init_from=adapter, trainable=trainable, dora_impl=spec.dora_impl,
                           dora_dropout=spec.dora_dropout)
    if not trainable:
        model.eval()
    return base, model, tokenizer


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config (config.json), from a folder or the hub; no weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def empty_model(config, *, dtype=None, trust_remote_code: bool = False):
    """The model a config describes, with its parameters on the meta device (no memory, no weights); buffers such
    as rotary frequencies are real. Built whole, not ZeRO-3 partitioned, whatever a DeepSpeed trainer left behind."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    whole_weights_on_load()
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                **({"dtype": dtype} if dtype is not None else {}))
