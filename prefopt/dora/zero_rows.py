"""Base rows of norm 0: found, counted and made safe for DoRA (docs/dora.md, "Base rows of norm 0").

A base weight row of zeros (large MoE checkpoints hold hundreds) has ||W_i + s B_i A|| = 0 while B_i = 0, as at
init, and its magnitude starts at ||W_i|| = 0: DoRA's scale m / ||W + s B A|| is 0 / 0, NaN at step 0 under PEFT
(peft#2049). prefopt holds that scale at 0 instead, so the row's output stays the base's (0) and its gradients 0:
- the fast forward always (`ops.inv_norm_s`: 0 where the norm is 0; other rows unchanged, bit for bit);
- PEFT's own DoRA forward and merge on a model guarded here (`forward.guard_peft_norms`);
- the streaming merge (`prefopt.merging.stream.merged_weight`).
This module finds the rows (on a loaded model, or in a local checkpoint's safetensors before any model loads) and
says how many.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..console import say
from ..quant import harden_4bit_layers
from .forward import base_norm2, dora_layers, guard_peft_norms
from .ops import rows_norm2

_PEFT_PREFIX = "base_model.model."  # PeftModel's names for the base model's modules


def _module_name(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX)


def find_zero_rows(peft_model) -> dict[str, int]:
    """{module name: rows} for every DoRA layer whose base weight has output rows of norm 0 (the weight
    dequantized, as the layer computes with it). Counted from the base weight, not the magnitude (which equals
    ||W_i|| only at init): the fast path's cached ||W_i||^2 where it has one, else one layer at a time, each
    dequantized weight let go at once. A weight that is not all here (meta device, ZeRO-3 or FSDP shard) is skipped.
    """
    harden_4bit_layers(peft_model)  # bitsandbytes' CPU repacking would scramble the dequantized rows
    found = {}
    for name, layer in dora_layers(peft_model):
        norm2 = base_norm2(layer)
        if norm2 is None:
            continue
        n = int((norm2 == 0).sum())
        if n:
            found[_module_name(name)] = n
    return found


def guard_zero_rows(peft_model, echo=say) -> dict[str, int]:
    """Find the base rows of norm 0 of a PEFT DoRA model and make its PEFT DoRA forward and merge safe for them
    (the fast forward always is); says how many (`echo`, None: silent) and returns {module name: rows}."""
    guard_peft_norms(peft_model)
    found = find_zero_rows(peft_model)
    note = zero_rows_note(found)
    if note and echo is not None:
        echo(f"prefopt: note: {note}")
    return found


def zero_rows_note(found: dict[str, int], *, shown: int = 4) -> str | None:
    """What was found, in one line without a prefix (None when nothing was): `guard_zero_rows` says it as a
    `prefopt: note:`, `prefopt plan` can list it with its notes."""
    if not found:
        return None
    total = sum(found.values())
    listed = ", ".join(f"{k}: {v}" for k, v in list(found.items())[:shown]) + (", ..." if len(found) > shown else "")
    rows = "row" if total == 1 else "rows"
    modules = "module" if len(found) == 1 else "modules"
    return (f"DoRA: {total} base {rows} of norm 0 in {len(found)} {modules} ({listed}): their DoRA scale is held "
            "at 0 (PEFT would give NaN)")


# ---------------------------------------------------------------------------------------------- a checkpoint on disk


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    where = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({k: path for k in f.keys()})
    return where


def zero_rows_in_checkpoint(folder: str | Path, modules: Iterable[str], *, rows_at_once: int = 4096) -> dict[str, int]:
    """{module name: rows} of norm 0 in the `<module>.weight` tensors of a local safetensors checkpoint, read a
    slice of rows at a time (memory-mapped; no model is built). `modules`: the adapted modules' names as the
    checkpoint spells them (e.g. `module_names(peft_model)` of a weightless PEFT model). A quantized recipe
    quantizes these same weights at load, and a row of zeros stays one (NF4 and int8 map 0 to 0), so the count
    holds there too. Tensors that are absent or not floating point (a pre-quantized checkpoint) are skipped."""
    from safetensors import safe_open

    where = _weight_files(Path(folder))
    found = {}
    for name in modules:
        key = f"{_module_name(name)}.weight"
        if key not in where:
            continue
        with safe_open(str(where[key]), framework="pt") as f:
            sl = f.get_slice(key)
            shape = sl.get_shape()
            if len(shape) != 2 or sl.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                continue
            n = sum(int((rows_norm2(sl[i : i + rows_at_once]) == 0).sum()) for i in range(0, shape[0], rows_at_once))
        if n:
            found[_module_name(name)] = n
    return found


def module_names(peft_model) -> list[str]:
    """The DoRA layers' module names as the base checkpoint spells them (works on a weightless model too)."""
    return [_module_name(name) for name, _ in dora_layers(peft_model)]
