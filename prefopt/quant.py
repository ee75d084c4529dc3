"""bitsandbytes, in one place: the quantization config a base loads with, the CPU repack guard, dequantization,
and the NF4 / int8 round trip a merge replays. Below both model loading and the DoRA forward."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _compat
from .config import ModelSection, defaults

if TYPE_CHECKING:
    import torch

_MODEL = defaults(ModelSection)  # the schema's defaults


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(quantization: str, dtype: str, quant_storage: str = _MODEL["quant_storage"]):
    """The bitsandbytes config the base is loaded with (None when unquantized). quant_storage: the container dtype
    of the packed 4-bit weights (a float one lets FSDP flatten them with the bf16 weights; same numbers)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(dtype),
            bnb_4bit_quant_storage=torch.uint8 if quant_storage == "uint8" else torch_dtype(quant_storage),
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def harden_4bit_layers(model) -> int:
    """Keep bitsandbytes' CPU repacking off on every Linear4bit; returns how many layers were touched.

    bitsandbytes >= 0.48 repacks a Linear4bit's weight into a CPU-only layout on its first eval/no-grad
    forward on CPUs with AVX512-BF16. After that `dequantize_4bit` returns scrambled values, so PEFT's DoRA
    weight norm and any merge that dequantizes go silently wrong (or crash for in_features % 64 != 0).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _compat.disable_cpu_repack(module)
            n += 1
    return n


def compute_dtype_4bit(base, x: torch.Tensor) -> torch.dtype:
    """The dtype a bitsandbytes Linear4bit computes in for input x, settling it as the layer's own forward does."""
    return _compat.settle_4bit_compute_dtype(base, x)


def dequantize_4bit(base, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh dequantization of a Linear4bit's weight (in `dtype`, if given)."""
    import bitsandbytes as bnb

    w = base.weight
    deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return deq if dtype is None or deq.dtype == dtype else deq.to(dtype)


def roundtrip(weight, info: dict):
    """The base weight as a quantized training base presents it: quantize, dequantize (fp32)."""
    import bitsandbytes.functional as F
    import torch

    w = weight.to(torch_dtype(info["dtype"]))
    q = info["quantization"]
    if q == "nf4":
        b = info.get("bnb", {"quant_type": "nf4", "blocksize": 64, "double_quant": True})
        packed, state = F.quantize_4bit(w, blocksize=b["blocksize"], compress_statistics=b["double_quant"],
                                        quant_type=b["quant_type"])
        return F.dequantize_4bit(packed, state).to(torch.float32)
    if q == "int8":
        w = w.to(torch.float16)  # LLM.int8 quantizes fp16 row-wise by absmax
        cb, scb, _ = F.int8_vectorwise_quant(w)
        return (cb.float() * scb.float().unsqueeze(1) / 127.0).to(torch.float32)
    return w.to(torch.float32)


def dequantize(base) -> torch.Tensor:
    """A quantized (or plain) base layer's weight as a float tensor, without touching the module: bitsandbytes
    4-bit and 8-bit here (PEFT's helper re-assigns an 8-bit weight on CPU, which breaks the layer's next forward),
    anything else through PEFT's `dequantize_module_weight`."""
    w = base.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        return dequantize_4bit(base)
    if kind == "Int8Params":
        import bitsandbytes as bnb

        scb = base.state.SCB if getattr(base, "state", None) is not None and base.state.SCB is not None else w.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))
    return _compat.peft_dequantize(base)


def nf4_settings(model) -> dict | None:
    """The 4-bit quantization a loaded model's Linear4bit layers use (quant type, block size, double quant), so a
    merge can replay the same round trip; None when it has none."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # under FSDP the weight is a DTensor shard outside the forward; bitsandbytes keeps the state on the module
            qs = getattr(m.weight, "quant_state", None) or getattr(m, "quant_state", None)
            return {"quant_type": qs.quant_type, "blocksize": qs.blocksize, "double_quant": bool(qs.nested)}
    return None
