"""Load the base model (4-bit NF4 / 8-bit / unquantized), the tokenizer, and the ONE adapter config.

`load_model(spec, ...)` is the one way prefopt loads base + tokenizer + adapter: training, the data step's reference
filter and the evaluation all call it. `empty_model` builds a weightless (meta-device) model from a config, for
everything that only needs the model's shape. Components take the values they need, not the Recipe.
"""

from __future__ import annotations

import contextlib
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
    init: str = _ADAPTER["init"],
):
    """The one PEFT adapter config every stage shares."""
    from peft import EvaConfig, LoraConfig

    if init not in INIT_WEIGHTS:
        raise ValueError(f"init must be one of {', '.join(INIT_WEIGHTS)}, got {init!r}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_dora=use_dora,
        use_rslora=use_rslora,
        init_lora_weights=INIT_WEIGHTS[init],
        # EVA with rho 1: every layer keeps rank r (no redistribution), so the chain keeps ONE adapter shape
        **({"eva_config": EvaConfig(rho=1.0)} if init == "eva" else {}),
        bias="none",
        task_type="CAUSAL_LM",
    )


# adapter.init -> PEFT's init_lora_weights
INIT_WEIGHTS = {"kaiming": True, "gaussian": "gaussian", "eva": "eva", "pissa": "pissa", "olora": "olora"}
REWRITING = ("pissa", "olora")  # PEFT values that move part of W into the adapter (W becomes W - s*B0*A0)
INIT_ADAPTER = "init_adapter"  # in an adapter folder trained from such an init: the adapter as it started


def initial_adapter(folder: str | Path | None) -> Path | None:
    """The initial adapter of a base-rewriting init that an adapter folder descends from (its record of how the base
    was rewritten), or None. A folder holding such an initial adapter itself counts too."""
    if folder is None:
        return None
    folder = Path(folder)
    if (folder / INIT_ADAPTER / "adapter_config.json").is_file():
        return folder / INIT_ADAPTER
    cfg = folder / "adapter_config.json"
    if cfg.is_file():
        import json

        if json.loads(cfg.read_text()).get("init_lora_weights") in REWRITING:
            return folder
    return None


class Residual:
    """What a base-rewriting init moved out of each base weight: s * B0 @ A0 per adapted layer, from its initial
    adapter (small: the factors are kept, each product made when asked, so a merge never holds them all)."""

    def __init__(self, initial: Path):
        import json
        import math

        from safetensors.torch import load_file

        cfg = json.loads((initial / "adapter_config.json").read_text())
        r, alpha = cfg["r"], cfg["lora_alpha"]
        self.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        tensors = load_file(str(initial / "adapter_model.safetensors"))
        self.factors = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight":
                        (tensors[key.replace(".lora_A.", ".lora_B.")], tensors[key])
                        for key in tensors if key.endswith(".lora_A.weight")}

    def delta(self, key: str):
        """s * B0 @ A0 in fp32 for a base weight's key (e.g. model.layers.0.mlp.up_proj.weight), or None."""
        pair = self.factors.get(key)
        return None if pair is None else self.scale * (pair[0].float() @ pair[1].float())

    def apply(self, key: str, w, dtype=None):
        """The rewritten weight as training saw it: (W in the training dtype, in fp32, minus the delta) cast back to
        the training dtype -- PEFT's arithmetic (pissa_init, olora_init). W unchanged for a layer not adapted."""
        d = self.delta(key)
        if d is None:
            return w
        dtype = dtype or w.dtype
        return (w.to(dtype).float() - d.to(w.device)).to(dtype)


def rewrite_base(model, initial: Path) -> int:
    """Rewrite a freshly loaded (full-precision) base as the init rewrote it: W = (W_fp32 - s * B0 @ A0) cast back,
    PEFT's own arithmetic (pissa_init, olora_init), so every stage, the evaluation and the merge see the base the
    adapter was trained on. Returns the layers rewritten."""
    import torch

    residual = Residual(initial)
    with torch.no_grad():
        for key in residual.factors:
            w = model.get_submodule(key.removesuffix(".weight")).weight
            if not w.is_floating_point() or w.element_size() == 1:
                raise PrefoptError(f"{key}: a base-rewriting adapter init needs a full-precision base "
                                   "(model.quantization: none)")
            w.data = residual.apply(key, w.data)
    return len(residual.factors)


def adapter_config_from_section(adapter) -> object:
    """LoraConfig from the recipe's adapter section (a thin mapping; keeps call sites explicit)."""
    return build_lora_config(
        r=adapter.r,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.use_rslora,
        init=adapter.init,
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
                   dora_impl: str = _ADAPTER["dora_impl"], dora_dropout: str = _ADAPTER["dora_dropout"],
                   init_rows=None, tokenizer=None):
    """Wrap the base with the running adapter: a fresh one, or the previous stage's (same config, same weights).

    A fresh EVA adapter is initialised from `init_rows` (the first stage's training rows). An adapter descending from
    a base-rewriting init (pissa, olora) first rewrites the base as the init did (`initial_adapter`). DoRA adapters
    take prefopt's exact low-rank forward unless dora_impl="peft" (see prefopt.dora).
    """
    from peft import PeftConfig, PeftModel, get_peft_model

    if init_from is None:
        peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)
        if lora_config.init_lora_weights == "eva":
            eva_init(peft_model, init_rows, tokenizer)
        return _with_dora_impl(peft_model, lora_config, dora_impl, dora_dropout)
    saved = PeftConfig.from_pretrained(str(init_from))
    diffs = _same_adapter(saved, lora_config)
    if diffs:
        raise PrefoptError(
            f"adapter in {init_from} does not match the recipe's adapter section ({'; '.join(diffs)}); "
            "the chain shares one adapter config: re-run with --fresh or restore the adapter section"
        )
    initial = initial_adapter(init_from)
    if initial is not None:
        rewrite_base(model, initial)
    saved.init_lora_weights = True  # the saved weights are loaded: no init runs again (pissa would rewrite W twice)
    peft_model = PeftModel.from_pretrained(model, str(init_from), adapter_name=ADAPTER_NAME, is_trainable=trainable,
                                           config=saved)
    peft_model.__dict__["_prefopt_initial_adapter"] = initial
    harden_4bit_layers(peft_model)
    return _with_dora_impl(peft_model, lora_config, dora_impl, dora_dropout)


def eva_init(peft_model, rows, tokenizer, *, batch_size: int = 8, max_length: int = 512) -> None:
    """EVA: each layer's A from an SVD of its inputs on the given rows (PEFT's initialize_lora_eva_weights), B zero,
    so the model still starts at the base."""
    import torch
    from peft import initialize_lora_eva_weights

    texts = [_row_text(r, tokenizer) for r in (rows or [])]
    if not texts or tokenizer is None:
        raise PrefoptError("adapter.init eva needs the first stage's training rows and the tokenizer")
    device = next(p.device for p in peft_model.parameters())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batches():
        for k in range(0, len(texts), batch_size):
            ids = [x[:max_length] for x in tokenizer(texts[k: k + batch_size], add_special_tokens=False)["input_ids"]]
            width = max(len(x) for x in ids)
            yield {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device),
                   "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids],
                                                  device=device)}

    initialize_lora_eva_weights(peft_model, list(batches()), adapter_name=ADAPTER_NAME, show_progress_bar=False)


def _row_text(row: dict, tokenizer) -> str:
    """A canonical training row as the text the model reads (the chat template for messages)."""
    def chat(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False)

    if "text" in row:
        return row["text"]
    if "messages" in row:
        return chat(row["messages"])
    answer = row.get("chosen", row.get("completion"))
    if isinstance(row["prompt"], list):
        return chat(row["prompt"] + answer)
    return row["prompt"] + answer


@contextlib.contextmanager
def base_view(model):
    """The base model's outputs, for everything that compares with the base (evaluation, the reference filter): the
    adapter disabled; after a base-rewriting init (the base in memory is W - s*B0*A0), the adapter as it started
    instead, which adds back what the init took out."""
    initial = model.__dict__.get("_prefopt_initial_adapter")
    if initial is None:
        with model.disable_adapter():
            yield
        return
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    active = model.active_adapter
    cfg = PeftConfig.from_pretrained(str(initial))
    cfg.init_lora_weights, cfg.inference_mode = True, True  # loaded, not initialised (pissa would rewrite W again)
    model.add_adapter(INITIAL_NAME, cfg)
    set_peft_model_state_dict(model, load_file(str(initial / "adapter_model.safetensors")), adapter_name=INITIAL_NAME)
    try:
        model.set_adapter(INITIAL_NAME)
        yield
    finally:
        model.set_adapter(active)
        model.delete_adapter(INITIAL_NAME)


INITIAL_NAME = "prefopt_initial"


def _with_dora_impl(peft_model, lora_config, dora_impl: str, dora_dropout: str):
    if dora_impl not in ("fast", "peft"):
        raise ValueError(f"dora_impl must be 'fast' or 'peft', got {dora_impl!r}")
    if lora_config.use_dora and dora_impl == "fast":
        from .dora import enable_fast_dora  # (imports torch: a heavy import, kept out of `prefopt --help`)

        enable_fast_dora(peft_model, dora_dropout)
    if lora_config.use_dora:
        from .dora import guard_zero_rows  # (imports torch)

        # base rows of norm 0: DoRA scale held at 0 (PEFT: NaN), counted and said; the counts kept for run.json
        peft_model.__dict__["_prefopt_zero_rows"] = guard_zero_rows(peft_model)
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


def load_model(spec: ModelSpec, lora_config=None, *, adapter: str | Path | None = None, trainable: bool = True,
               init_rows=None):
    """The base, the tokenizer, and the adapter on the base: `(base, model, tokenizer)`.

    `adapter` continues a saved adapter (None: a fresh one from `lora_config`, EVA's from `init_rows`); with
    `lora_config` None the saved adapter's own config is used. A fresh adapter whose init rewrites the base (pissa,
    olora) is made once on a first copy of the base and saved (its `initial_adapter` record), then attached to a
    second copy through the same path as every later load. An inference model (`trainable=False`) is put in eval
    mode."""
    base = _load_spec_base(spec)
    tokenizer = load_tokenizer(spec.name_or_path, chat_template=spec.chat_template, revision=spec.revision,
                               trust_remote_code=spec.trust_remote_code)
    if lora_config is None:
        from peft import PeftConfig

        lora_config = PeftConfig.from_pretrained(str(adapter))
    if adapter is None and lora_config.init_lora_weights in REWRITING:
        adapter = _initial_adapter(base, lora_config)
        del base  # the spent copy goes before the second loads: one base in memory at a time
        base = _load_spec_base(spec)
    model = attach_adapter(base, lora_config, init_from=adapter, trainable=trainable, dora_impl=spec.dora_impl,
                           dora_dropout=spec.dora_dropout, init_rows=init_rows, tokenizer=tokenizer)
    if not trainable:
        model.eval()
    return base, model, tokenizer


def _load_spec_base(spec: ModelSpec):
    return load_base_model(spec.name_or_path, quantization=spec.quantization, dtype=spec.dtype,
                           revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                           quant_storage=spec.quant_storage)


def _initial_adapter(base, lora_config) -> Path:
    """PEFT's base-rewriting init on this copy of the base, saved to a new temporary folder (the copy is spent)."""
    import gc
    import tempfile

    from peft import get_peft_model

    peft_model = get_peft_model(base, lora_config, adapter_name=ADAPTER_NAME)
    folder = Path(tempfile.mkdtemp(prefix="prefopt-initial-adapter-"))
    peft_model.save_pretrained(str(folder), selected_adapters=[ADAPTER_NAME], safe_serialization=True)
    for p in peft_model.parameters():  # the caller's name for the base still holds it: free its weights here
        p.data = p.data.new_empty(0)
    del peft_model, base
    gc.collect()
    return folder


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
