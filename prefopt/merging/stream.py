"""Adapter -> merged checkpoint, streamed shard by shard, DoRA-exact, and verified.

Math, in fp32, then cast to the output dtype:
    LoRA  W' = W + s * B @ A
    DoRA  W' = m * (W + s * B @ A) / ||W + s * B @ A||      (norm per output row, as PEFT's DoRA layer)
with s = alpha / r (alpha / sqrt(r) with rsLoRA). W is the base weight as the adapter saw it in training:
`dequantized` puts each weight through the same NF4 / int8 round trip the training base went through;
`original` uses the unquantized weights as stored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import AdapterSection, MergeSection, defaults
from ..errors import MergeError, option
from ..models import BASE_INFO, Residual, initial_adapter
from ..quant import roundtrip, torch_dtype
from ..runs.folder import adapter_hash
from .heap import large_blocks_from_the_os
from .onepass import merge_verified, output_plan, refuse_misfits, write_merged
from .tensorfile import Source, Writer
from .verify import device
from .verify import verify as _verify

REPORT = "merge_report.json"
_MERGE = defaults(MergeSection)  # the schema's merge settings and thresholds, written there once
_ADAPTER = defaults(AdapterSection)


@dataclass
class Thresholds:
    """When a merge fails its verification. bf16 output rounding stays far below the defaults; a dropped DoRA
    magnitude or a wrong base lands far above (tests/test_merge.py; docs/merge.md)."""

    max_rel_logit_diff: float = _MERGE["max_rel_logit_diff"]  # max |logit_merged - logit_adapter| / max |logit_adapter|
    mean_kl: float = _MERGE["mean_kl"]  # mean KL(adapter || merged) per token
    min_top1_agreement: float = _MERGE["min_top1_agreement"]

    @classmethod
    def of(cls, merge_section) -> Thresholds:
        return cls(merge_section.max_rel_logit_diff, merge_section.mean_kl, merge_section.min_top1_agreement)


# ---------------------------------------------------------------------------------------------- weights


def merged_weight(w, lora_a, lora_b, scale: float, magnitude=None):
    """fp32 merge of one weight; DoRA when `magnitude` is given. An fp32 `w` is overwritten with the result (no
    full-size temporary: W + s B A in one addmm, the DoRA scale applied in place). A row of norm 0 (a base row of
    zeros that the adapter left at zero) stays 0: its DoRA scale is held at 0, as in training (docs/dora.md), not
    0 / 0 = NaN."""
    import torch

    f32 = torch.float32
    combined = w.to(f32).addmm_(lora_b.to(f32), lora_a.to(f32), alpha=scale)
    if magnitude is None:
        return combined
    norm = torch.linalg.norm(combined, dim=1)
    mag_norm_scale = (magnitude.to(f32) / norm).masked_fill_(norm == 0, 0)
    return combined.mul_(mag_norm_scale.unsqueeze(1))


def merge_tensor(key: str, raw, parts: dict, *, scale: float, info: dict, base_mode: str, residual, dtype,
                 work=None, out=None):
    """One adapted base tensor merged, in the output dtype. The base weight is the one the adapter saw in training
    (`dequantized`: through the NF4 / int8 round trip; a base-rewriting init's residual taken out) or the original
    (`original`). `raw` is never written to; `work` (fp32) and `out` (output dtype), when given, are buffers of the
    tensor's shape to compute in and to return (the verified merge reuses them layer after layer)."""
    import torch

    if base_mode == "dequantized":
        w = roundtrip(raw, info)
    elif work is not None:
        w = work.copy_(raw)
    else:
        w = raw.to(torch.float32, copy=True)
    if w.data_ptr() == raw.data_ptr():  # (merged_weight works in place: never on the base as read)
        w = w.clone()
    if residual is not None:  # a base-rewriting init (pissa, olora): the base the adapter trained on
        w = residual.apply(key, w, torch_dtype(info["dtype"])).float()
    merged = merged_weight(w, parts["A"], parts["B"], scale, parts["m"])
    return out.copy_(merged) if out is not None else merged.to(dtype)


# ---------------------------------------------------------------------------------------------- adapter


@dataclass
class Adapter:
    config: dict
    scale: float
    use_dora: bool
    # base weight key -> {"A": tensor, "B": tensor, "m": tensor | None}
    modules: dict
    folder: Path | None = None


def read_adapter(adapter_dir: Path) -> Adapter:
    from safetensors.torch import load_file

    cfg_path, w_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise MergeError(f"{adapter_dir}: not a PEFT adapter folder (needs adapter_config.json and "
                         "adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir}: peft_type {cfg.get('peft_type')} is not LoRA/DoRA")
    if cfg.get("fan_in_fan_out"):
        raise MergeError(f"{adapter_dir}: fan_in_fan_out adapters are not supported by the streaming merge")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise MergeError(f"{adapter_dir}: per-module rank/alpha patterns are not supported yet")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(w_path))
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        for part, tag in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m")):
            if key.endswith(part):
                name = key[: -len(part)].removeprefix("base_model.model.")
                modules.setdefault(name + ".weight", {})[tag] = t
                break
        else:
            raise MergeError(f"{adapter_dir}: tensor {key} is not a LoRA/DoRA tensor (modules_to_save, "
                             "embeddings and biases are not supported by the streaming merge)")
    use_dora = bool(cfg.get("use_dora"))
    problems = []
    for name, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            problems.append(f"{name}: missing lora_{'A' if 'A' not in parts else 'B'}")
        if use_dora and parts.get("m") is None:
            problems.append(f"{name}: DoRA adapter without its magnitude vector")
        parts.setdefault("m", None)
    if problems:
        raise MergeError(f"{adapter_dir}: refusing to merge ({len(problems)} problems; a DoRA adapter is never merged "
                         "as plain LoRA): " + "; ".join(problems[:5]))
    return Adapter(config=cfg, scale=scale, use_dora=use_dora, modules=modules, folder=adapter_dir)


# ---------------------------------------------------------------------------------------------- streaming merge


def _base_shards(base_dir: Path) -> tuple[list[str], dict | None]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        return sorted(set(idx["weight_map"].values())), idx
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"], None
    raise MergeError(f"{base_dir}: no model.safetensors or model.safetensors.index.json (safetensors only)")


def resolve_base_dir(base: str) -> Path:
    p = Path(base).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as e:
        raise MergeError(f"base '{base}': not a local folder and not downloadable ({str(e).splitlines()[0]})") from None


def stream_merge(adapter: Adapter, base_dir: Path, out_dir: Path, *, info: dict, base_mode: str,
                 out_dtype: str, max_shard_bytes: int = 256 * 2**20, on_start=None, on_written=None,
                 stop=None) -> dict:
    """Merge tensor by tensor into out_dir: every tensor read by its byte range, merged where adapted, and written
    at its place in output shards of at most `max_shard_bytes` (plus an index), planned before anything is
    computed (prefopt.merging.tensorfile); peak memory is about one layer in fp32 plus the adapter. The verified
    merge runs it in a thread of its own: `on_start(writer)`, `on_written(key)` after each tensor, `stop()`
    checked between tensors. Returns counts."""
    src = Source(base_dir, _base_shards(base_dir)[0])
    writer = None
    try:
        refuse_misfits(adapter, src)
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = Writer(out_dir, output_plan(src, adapter.modules, out_dtype), max_shard_bytes)
        if on_start is not None:
            on_start(writer)
        initial = initial_adapter(adapter.folder)
        one = functools.partial(merge_tensor, scale=adapter.scale, info=info, base_mode=base_mode,
                                residual=Residual(initial) if initial is not None else None,
                                dtype=torch_dtype(out_dtype))
        write_merged(src, writer, adapter, one, device(), on_written=on_written, stop=stop)
        if stop is not None and stop():
            writer.abandon()
            return {}
        counts = writer.close()
        if on_start is None:
            writer.files.close()
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    finally:
        src.close()
    return {"tensors_merged": len(adapter.modules), "shards": counts["shards"]}


def copy_side_files(base_dir: Path, adapter_dir: Path, out_dir: Path, out_dtype: str) -> None:
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = out_dtype
    cfg.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("generation_config.json",):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    # the tokenizer as trained (the adapter folder holds it, chat template included); else the base's
    src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for p in src.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "chat_template")) or p.suffix in (".model", ".tiktoken") \
                or p.name in ("vocab.json", "merges.txt", "added_tokens.json"):
            shutil.copy2(p, out_dir / p.name)


# ---------------------------------------------------------------------------------------------- verification


def verify(out_dir: Path, adapter_dir: Path, info: dict, base_dir: Path, probe_rows, thresholds: Thresholds,
           **kwargs) -> dict:
    """The merged model vs the adapter model as trained, on probe prompts (see prefopt.merging.verify)."""

    return _verify(out_dir, adapter_dir, info, base_dir, probe_rows, thresholds, **kwargs)


# ---------------------------------------------------------------------------------------------- entry points


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    base_mode: str = _MERGE["base"],
    quantization: str | None = None,
    dtype: str | None = None,
    out_dtype: str = _MERGE["dtype"],
    overwrite: bool = False,
    verify_merge: bool = _MERGE["verify"],
    probe_rows: list[dict] | None = None,
    thresholds: Thresholds | None = None,
    report_extra: dict | None = None,
    probe_note: str | None = None,
    dora_impl: str = _ADAPTER["dora_impl"],
    dora_dropout: str = _ADAPTER["dora_dropout"],
    peft_forward: bool | None = None,
    echo=print,
) -> dict:
    """Merge one adapter into its base; writes out_dir (whole or not at all) with merge_report.json.

    base / quantization / dtype default to what the adapter's prefopt_base.json recorded in training.
    base_mode: auto (dequantized when training used a quantized base, else original) | dequantized | original.
    peft_forward: also run PEFT's DoRA forward in the verification and report it beside (None: auto, on for a base
    under 1 GiB).
    Raises MergeError (exit code 2 from the CLI) on refusals and on failed verification (the merged
    folder is kept for inspection, its report says why).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    thresholds = thresholds or Thresholds()
    info = _training_base(adapter_dir, base, quantization, dtype)
    base_mode = _base_mode(base_mode, info["quantization"])
    settings = {"adapter_hash": adapter_hash(adapter_dir), "base": info["name_or_path"], "base_mode": base_mode,
                "out_dtype": out_dtype}
    if out_dir.exists() and not overwrite:
        current = current_merge(out_dir, settings, verify_merge=verify_merge, thresholds=thresholds)
        if isinstance(current, dict):
            echo(f"prefopt: merge: {out_dir} is current (the same adapter, base and settings"
                 f"{', verified' if verify_merge else ''}); nothing to do ({option('overwrite')} merges again)")
            return current
        raise MergeError(f"{out_dir} already exists and {current}; pass {option('overwrite')} to replace it")
    adapter = read_adapter(adapter_dir)
    base_dir = resolve_base_dir(info["name_or_path"])
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    _remove_dead_temps(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        verification = None
        if verify_merge:  # merged and verified together (prefopt.merging.onepass)
            tmp.mkdir(parents=True)
            copy_side_files(base_dir, adapter_dir, tmp, out_dtype)
            merge = functools.partial(stream_merge, adapter, base_dir, tmp, info=info, base_mode=base_mode,
                                      out_dtype=out_dtype)
            with large_blocks_from_the_os():
                counts, verification = merge_verified(
                    adapter, base_dir, _base_shards(base_dir)[0], tmp, info=info, base_mode=base_mode,
                    out_dtype=out_dtype, probe_rows=probe_rows, thresholds=thresholds, merge=merge,
                    dora_impl=dora_impl, dora_dropout=dora_dropout, peft_forward=peft_forward, echo=echo)
        else:
            with large_blocks_from_the_os():
                counts = stream_merge(adapter, base_dir, tmp, info=info, base_mode=base_mode, out_dtype=out_dtype)
            copy_side_files(base_dir, adapter_dir, tmp, out_dtype)
        report = {"adapter": str(adapter_dir), "base": info["name_or_path"], "base_mode": base_mode,
                  "training_quantization": info["quantization"], "training_dtype": info["dtype"],
                  "method": "dora" if adapter.use_dora else "lora", "scale": adapter.scale, "out_dtype": out_dtype,
                  "adapter_hash": settings["adapter_hash"], **counts, **(report_extra or {})}
        if verify_merge:
            report["verification"] = verification
            if report["verification"]["probe_source"] == "fixed prompts" and probe_note:
                report["verification"]["probe_note"] = probe_note
                echo(f"prefopt: merge: {probe_note}; verifying on {report['verification']['probes']} fixed prompts")
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say_verdict(report.get("verification"), base_mode, out_dir, echo)
    return report


def _remove_dead_temps(out_dir: Path) -> None:
    """Temp folders of this output left by merges that were killed (their process is gone): a killed merge cannot
    clean up after itself, the next one does."""
    for p in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _training_base(adapter_dir: Path, base, quantization: str | None, dtype: str | None) -> dict:
    """How the adapter's base was loaded in training (prefopt_base.json), with what the caller overrides."""
    recorded = json.loads((adapter_dir / BASE_INFO).read_text()) if (adapter_dir / BASE_INFO).is_file() else {}
    info = {
        "name_or_path": str(base or recorded.get("name_or_path") or ""),
        "quantization": quantization or recorded.get("quantization") or "none",
        "dtype": dtype or recorded.get("dtype") or "float32",
    }
    if recorded.get("bnb") and info["quantization"] == recorded.get("quantization"):
        info["bnb"] = recorded["bnb"]
    if not info["name_or_path"]:
        raise MergeError(f"{adapter_dir}: no base recorded; pass {option('base', 'MODEL')}")
    return info


def _base_mode(base_mode: str, quantization: str) -> str:
    """auto: the dequantized base when training used a quantized one (the weights the adapter learned against)."""
    if base_mode == "auto":
        base_mode = "dequantized" if quantization != "none" else "original"
    if base_mode not in ("dequantized", "original"):
        raise MergeError(f"merge base must be auto, dequantized or original, got {base_mode!r}")
    if base_mode == "dequantized" and quantization == "none":
        raise MergeError("merge base 'dequantized' needs the training quantization (nf4 or int8); "
                         "the adapter was trained on an unquantized base: use 'original'")
    return base_mode


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """The finished merge replaces out_dir in one rename; the old folder goes aside first (a temp name that run
    start-up clears)."""
    aside = out_dir.with_name(f".{out_dir.name}.tmp-old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, aside)
    os.replace(tmp, out_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _say_verdict(v: dict | None, base_mode: str, out_dir: Path, echo) -> None:
    """The verification's figures on the console; a failed verification is a MergeError (the folder is kept)."""
    if not v:
        echo(f"prefopt: merged into {out_dir} (not verified)")
        return
    verdict = "PASSED" if v["passed"] else "FAILED"
    echo(f"prefopt: merge {verdict}: max |Δlogit| {v['max_abs_logit_diff']:.3g} "
         f"({v['max_rel_logit_diff']:.2%} of max |logit|), mean KL {v['mean_kl']:.2e}, "
         f"top-1 agreement {v['top1_agreement']:.3f} over {v['tokens']} tokens of {v['probes']} "
         f"{v['probe_source']} ({base_mode} base, on {v['device']}) -> {out_dir}")
    pf = v.get("peft_forward")
    if pf and pf["max_abs_logit_diff_vs_trained"] > 0:
        echo(f"prefopt: merge: under PEFT's DoRA forward instead of the trained one: max |Δlogit| "
             f"{pf['max_abs_logit_diff']:.3g}, mean KL {pf['mean_kl']:.2e} (the two forwards differ by "
             f"{pf['max_abs_logit_diff_vs_trained']:.3g})")
    if not v["passed"]:
        raise MergeError(f"merged model does not behave like the adapter model: {'; '.join(v['failures'])} "
                         f"(see {out_dir / REPORT})")


def current_merge(out_dir: Path, settings: dict, *, verify_merge: bool, thresholds: Thresholds) -> dict | str:
    """The merge report when out_dir already holds this merge (same adapter by content, base, base mode, dtype;
    verified and passed under the same thresholds when verification is asked); else why not, in words."""
    try:
        report = json.loads((Path(out_dir) / REPORT).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "is not a finished merge (no readable merge_report.json)"
    if not isinstance(report, dict):
        return "is not a finished merge"
    if not (Path(out_dir) / "config.json").is_file() or not list(Path(out_dir).glob("*.safetensors")):
        return "has lost its config.json or weights"
    for key, what in (("adapter_hash", "another adapter"), ("base", "another base"),
                      ("base_mode", "another merge base"), ("out_dtype", "another dtype")):
        if report.get(key) != settings[key]:
            return f"holds a merge of {what}" + ("" if key != "adapter_hash" or report.get(key) else
                                                 " (or one made before prefopt recorded the adapter)")
    if verify_merge:
        v = report.get("verification") or {}
        if not v.get("passed"):
            return "holds a merge that was not verified, or failed its verification"
        if v.get("thresholds") != dataclasses.asdict(thresholds):
            return "was verified against other thresholds"
    return report
