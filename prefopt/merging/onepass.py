"""The default merge: merged and verified together, the verification running the merged model as its files hold it.

Two threads. The merge thread reads each base tensor, merges it where the adapter adapts it and writes it straight to
its place in the output shard (the layout planned from the headers first), layer by layer; its arithmetic and file
I/O release the GIL, so it runs while the main thread imports transformers and PEFT and builds the adapter model
weightless (meta device). The main thread then runs that model once over a batch holding the probe prompts twice:
the first half is the forward prefopt trained with (the base as training saw it, each quantized linear weight
through the same NF4/int8 round trip, plus the adapter through prefopt's fast DoRA forward), the second half is the
merged model, its weights read back from the output files as the merge wrote them. Each linear layer and norm, just
before it runs, has its base tensors and its merged tensors read and set for each half. So one forward gives:

- every adapted layer: the merged weight on the trained half's activations there, against the adapter's own output
  (`layers`: the worst relative difference, against a limit set by the output dtype's rounding);
- end to end: the two halves' logits on the probe tokens, against the thresholds;
- and, when `peft_forward` is on, a third slice under PEFT's DoRA forward, reported beside (not judged).

Last, sampled rows of every written tensor are read back through the safetensors library and compared with what the
merge computed for that key. Peak memory: about one linear layer's tensors in fp32 per thread, and the probes'
activations; no output shard is held. On a GPU the arithmetic stays on the device.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import MergeError
from ..models import Residual, initial_adapter, load_tokenizer
from ..quant import roundtrip, torch_dtype
from .tensorfile import _DTYPES, Source, Writer, dtype_name, torch_dtype_of
from .verify import _checkpoint_key, _empty, _key_of, _load_adapter, _to_device, _units, compare, device, probe_texts

PROBES = 6  # probe prompts, each cut to its last PROBE_TOKENS tokens: the logits check is end to end on few tokens
PROBE_TOKENS = 16
PEFT_PROBES = 2  # of them run under PEFT's DoRA forward too (reported beside, not judged)
PEFT_AUTO_MAX_BYTES = 1 << 30  # peft_forward "auto": on for a base under 1 GiB (its forward costs a full-size pass
# per layer for W + s B A, the largest cost of a verified merge on a larger model), off above
OVERLAP = True  # the merge in a thread of its own while the verification imports and builds its model
CHECK_ROWS = 32  # activation rows each adapted layer's merged weight is checked on
PROGRESS_EVERY_S = 5.0
BLOCK_BYTES = 64 << 20  # a tensor the merge only casts is read, cast and written a block of rows of this size at a time


def fits(key: str, shape: tuple, parts: dict) -> str | None:
    """Why an adapted module does not fit its base tensor (None when it does)."""
    a, b = parts["A"], parts["B"]
    if len(shape) != 2 or a.shape[1] != shape[1] or b.shape[0] != shape[0] or (
            parts["m"] is not None and parts["m"].numel() != shape[0]):
        return (f"adapter does not fit the base: {key} has shape {tuple(shape)}, adapter A {tuple(a.shape)} "
                f"B {tuple(b.shape)}; is this the base it was trained on?")
    return None


def layer_limit(out_dtype: str) -> float:
    """The largest relative difference an adapted layer's output may show between the merged weight (rounded to the
    output dtype) and the adapter's forward: a few times the dtype's rounding (bf16 ~2%, fp16 ~0.2%, fp32 1e-4).
    An NF4-vs-original mix-up (~10%), a dropped magnitude, a wrong scale or a transposed weight are far above."""
    import torch

    return max(2.5 * torch.finfo(torch_dtype(out_dtype)).eps, 1e-4)


def output_plan(src: Source, adapted: dict, out_dtype: str) -> list[tuple[str, str, tuple]]:
    """Each base tensor's key, output dtype and shape, in the base's order: adapted weights and every other float
    2-D weight in the output dtype, the rest as stored (what stream_merge writes)."""
    out = dtype_name(torch_dtype(out_dtype))
    plan = []
    for key, e in src.entries.items():
        floating = e.dtype in ("BF16", "F16", "F32", "F64")
        cast = key in adapted or (floating and key.endswith(".weight") and len(e.shape) == 2)
        plan.append((key, out if cast else e.dtype, e.shape))
    return plan


def _natural(key: str) -> list:
    """model.layers.2 before model.layers.10: the order the forward will want the tensors in."""
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def write_merged(src: Source, writer: Writer, adapter, merge_tensor, dev, *, on_written=None, stop=None) -> None:
    """Every base tensor read, merged where adapted (else cast, in blocks when large, or copied file to file) and
    written to its place, in layer order; `on_written(key)` after each, `stop()` checked between tensors."""
    import torch

    pool = _Pool()
    for key in sorted(src.entries, key=_natural):
        if stop is not None and stop():
            return
        e = src.entries[key]
        planned = getattr(torch, _torch_name(writer.dtype_of(key)))
        parts = adapter.modules.get(key)
        if parts is None and planned == torch_dtype_of(e.dtype):
            writer.copy(key, e)
        elif parts is None and len(e.shape) >= 1 and e.nbytes > BLOCK_BYTES:  # a large embedding or head: in blocks
            step = max(1, BLOCK_BYTES // max(1, e.nbytes // e.shape[0]))
            for r in range(0, e.shape[0], step):
                block = src.row_range(key, r, r + step).to(planned)
                writer.write(key, block, row0=r)
                writer.sample(key, block, row0=r)
        else:
            raw = src.read(key, out=pool.take((e.nbytes,), torch.uint8)).to(dev)
            if parts is not None:
                written = merge_tensor(key, raw, parts, work=pool.take(e.shape, torch.float32, dev),
                                       out=pool.take(e.shape, planned, dev))
            else:
                written = pool.take(e.shape, planned, dev).copy_(raw)
            writer.write(key, written)
            writer.sample(key, written)
            del raw, written
            pool.release()
        if on_written is not None:
            on_written(key)


class _Progress:
    """A line every few seconds on a long merge, from either thread: bytes merged and written, layers verified,
    elapsed, and the time left (the merge and the verification counted as half the work each)."""

    def __init__(self, writer: Writer, echo):
        self.writer, self.echo = writer, echo
        self.t0 = self.last = time.perf_counter()
        self.layer, self.layers = 0, 0
        self.lock = threading.Lock()

    def tick(self, prefix: str | None = None) -> None:
        if prefix is not None:
            parts = prefix.split(".")
            for i, p in enumerate(parts[:-1]):
                if p == "layers" and parts[i + 1].isdigit():
                    self.layer = max(self.layer, int(parts[i + 1]) + 1)
        now = time.perf_counter()
        with self.lock:
            if now - self.last < PROGRESS_EVERY_S:
                return
            self.last = now
        written = self.writer.bytes_written / max(self.writer.total, 1)
        done = (written + (self.layer / self.layers if self.layers else 0)) / 2
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        left = (now - self.t0) * (1 - done) / max(done, 1e-9)
        self.echo(f"prefopt: merge [{bar}] {self.writer.bytes_written / 2**30:.2f}/{self.writer.total / 2**30:.2f} "
                  f"GiB written, layer {self.layer}/{self.layers or '?'} verified, {now - self.t0:.0f} s, about "
                  f"{left:.0f} s left")


class _Merger(threading.Thread):
    """The merge (`merge(on_start=, on_written=, stop=)`: stream.stream_merge, as the caller looks it up) in a
    thread of its own; `wait(key)` blocks until that tensor is in the file, `writer` is the merge's."""

    def __init__(self, merge, progress_echo):
        super().__init__(name="prefopt-merge", daemon=True)
        self.merge, self.echo = merge, progress_echo
        self.cond = threading.Condition()
        self.done: set[str] = set()
        self.error: BaseException | None = None
        self.stop = False
        self.seconds = 0.0
        self.writer: Writer | None = None
        self.progress: _Progress | None = None
        self.result: dict = {}

    def _begun(self, writer: Writer) -> None:
        self.writer, self.progress = writer, _Progress(writer, self.echo)

    def _done_one(self, key: str) -> None:
        with self.cond:
            self.done.add(key)
            self.cond.notify_all()
        self.progress.tick()

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.result = self.merge(on_start=self._begun, on_written=self._done_one, stop=lambda: self.stop)
        except BaseException as err:  # handed to the main thread, which raises it
            self.error = err
        finally:
            self.seconds = time.perf_counter() - t0
            with self.cond:
                self.stop = True
                self.cond.notify_all()

    def wait(self, key: str) -> None:
        with self.cond:
            while key not in self.done and self.error is None and not self.stop:
                self.cond.wait()
        if self.error is not None:
            raise self.error
        if key not in self.done:
            raise MergeError(f"merge: {key} was never written (a bug, please report it)")


class _Pool:
    """Buffers of one layer's size, lent for one unit and reused by the next: a fresh large allocation is served by
    mmap (heap.py) and costs a page fault per 4 KiB on first touch, more than the arithmetic done in it."""

    MIN_BYTES = 1 << 20

    def __init__(self):
        self.free: dict[tuple, list] = {}
        self.lent: list = []

    def take(self, shape, dtype, device="cpu"):
        import math

        import torch

        n = math.prod(shape)
        if n * torch.empty(0, dtype=dtype).element_size() < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (n, dtype, str(device))
        spare = self.free.get(key)
        t = spare.pop() if spare else torch.empty(n, dtype=dtype, device=device)
        self.lent.append((key, t))
        return t.view(shape)

    def release(self) -> None:
        for key, t in self.lent:
            self.free.setdefault(key, []).append(t)
        self.lent = []


class _Pass:
    """The state of one merge-and-verify pass: where tensors come from and go, how each side sees a base tensor,
    and what the layer checks found."""

    def __init__(self, *, src, writer, merger, adapter, info, base_mode, dev, sizes, peft, progress):
        import torch

        self.src, self.writer, self.merger, self.adapter, self.info = src, writer, merger, adapter, info
        self.base_mode, self.dev, self.sizes, self.peft, self.progress = base_mode, dev, sizes, peft, progress
        self.quantized = info["quantization"] != "none"
        self.train_dtype = torch_dtype(info["dtype"])
        initial = initial_adapter(adapter.folder) if adapter.folder else None
        self.residual = Residual(initial) if initial is not None else None
        self.checked, self.worst, self.worst_key = 0, 0.0, None
        self.exercised: set[str] = set()
        self.nn = torch.nn
        self.pool = _Pool()
        self.waited = 0.0

    def merged(self, key: str, out=None):
        """The merged tensor as the merge wrote it, read back from the output file (once it is there)."""
        t0 = time.perf_counter()
        self.merger.wait(key)
        self.waited += time.perf_counter() - t0
        return self.writer.files.read(key, out=out)

    def as_trained(self, key: str, raw, owner, out=None):
        """A base tensor as the training saw it (what the adapter model computes with), in fp32 (in `out`)."""
        import torch

        if self.quantized and isinstance(owner, self.nn.Linear) and raw.dim() == 2:
            return roundtrip(raw, self.info)
        if self.residual is not None:
            return self.residual.apply(key, raw, self.train_dtype).to(self.train_dtype).to(torch.float32)
        t = raw if raw.dtype == self.train_dtype else raw.to(self.train_dtype)
        return out.copy_(t) if out is not None else t.to(torch.float32)

    def check_weight(self, key: str, raw, ref):
        """The base weight an adapted layer's merge is checked against, computed here from the base as read (not
        taken from the merge): `dequantized`, the weight as trained (through the NF4 / int8 round trip); `original`,
        the stored weight (which the merge folds the adapter into: with an fp32 base trained in bf16 that is not the
        bf16-rounded weight training saw, whose difference the logits check reports)."""
        import torch

        if self.base_mode == "dequantized" or (raw.dtype == self.train_dtype and self.residual is None
                                               and not self.quantized):
            return ref
        w = raw.to(torch.float32, copy=True)
        return self.residual.apply(key, w, self.train_dtype).float() if self.residual is not None else w

    def tensors(self, unit, prefix: str, names: list[str]) -> dict:
        """Each meta parameter of the unit: (trained value, merged value as written, check weight or None), fp32."""
        import torch

        out = {}
        pool, f32 = self.pool, torch.float32
        for n in names:
            key = _checkpoint_key(prefix, n)
            owner = unit.get_submodule(n.rsplit(".", 1)[0]) if "." in n else unit
            e, w = self.src.entries[key], self.writer.places[key][1]
            raw = self.src.read(key, out=pool.take((e.nbytes,), torch.uint8)).to(self.dev)
            ref = self.as_trained(key, raw, owner, out=pool.take(e.shape, f32, self.dev))
            check = self.check_weight(key, raw, ref) if key in self.adapter.modules else None
            written = self.merged(key, out=pool.take((w.nbytes,), torch.uint8)).to(self.dev)
            out[n] = (ref, pool.take(e.shape, f32, self.dev).copy_(written), check)
            self.exercised.add(key)
        return out

    def run_unit(self, unit, prefix, names, orig, x, args, kwargs):
        import torch

        values = self.tensors(unit, prefix, names)
        xs = list(x.split(self.sizes, dim=0))
        _set(unit, {n: v[0] for n, v in values.items()})
        y = [orig(xs[0], *args, **kwargs)]
        peft_class = getattr(type(unit), "_prefopt_peft_class", None)
        weight = values.get("base_layer.weight")
        if weight is not None:  # an adapted linear layer
            bias = values.get("base_layer.bias", (None, getattr(unit.base_layer, "bias", None)))[1]
            y.append(torch.nn.functional.linear(xs[1], weight[1], bias))
            self.layer_check(unit, prefix, orig, xs[0], y[0], weight, bias, args, kwargs)
        else:
            _set(unit, {n: v[1] for n, v in values.items()})
            y.append(orig(xs[1], *args, **kwargs))
        if self.peft:
            _set(unit, {n: v[0] for n, v in values.items()})
            forward = peft_class.forward if weight is not None and peft_class is not None else None
            y.append(forward(unit, xs[2], *args, **kwargs) if forward else orig(xs[2], *args, **kwargs))
        _set(unit, {n: None for n in values})
        del values
        self.pool.release()
        self.progress.tick(prefix)
        return torch.cat(y, dim=0)

    def layer_check(self, unit, prefix, orig, x_t, y_t, weight, bias, args, kwargs):
        """The merged weight on the trained half's activations against the adapter's own output there."""
        import torch

        rows = x_t.reshape(-1, x_t.shape[-1])[:CHECK_ROWS]
        if weight[2] is weight[0]:
            want = y_t.reshape(-1, y_t.shape[-1])[:CHECK_ROWS]
        else:  # `original` after a quantized base: the adapter's forward on the original weight
            _set(unit, {"base_layer.weight": weight[2]})
            want = orig(rows, *args, **kwargs)
        got = torch.nn.functional.linear(rows, weight[1], bias)
        rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        self.checked += 1
        if not rel <= self.worst:  # (a NaN is the worst)
            self.worst, self.worst_key = rel, f"{prefix}weight".replace(".base_layer.", ".")


def _torch_name(st_dtype: str) -> str:
    return _DTYPES[st_dtype]


def _set(unit, values: dict) -> None:
    """Set (or, with None, drop back to meta) the unit's weightless parameters; fast DoRA's norm caches go with
    them (they are keyed by the weight tensor)."""
    from accelerate.utils import set_module_tensor_to_device

    for n, v in values.items():
        if v is None:
            set_module_tensor_to_device(unit, n, "meta")
        else:
            set_module_tensor_to_device(unit, n, v.device, value=v)
    for m in unit.modules():
        m.__dict__.pop("_prefopt_w2", None)
        for plan in m.__dict__.get("_prefopt_plans", {}).values():
            plan.key = None


def _skeleton(adapter_dir: Path, base_dir: Path, dev, *, dora_impl: str, dora_dropout: str):
    """The adapter model on a weightless fp32 base (as verify.adapter_hiddens builds it): (root, decoder, peft on)."""
    import torch
    from peft import PeftModel

    base = _empty(base_dir, torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), low_cpu_mem_usage=True).eval()
    _load_adapter(model, adapter_dir, dev)
    _to_device(model, dev)
    use_dora = bool(model.peft_config["default"].use_dora)
    fast = use_dora and dora_impl == "fast"
    if use_dora:
        from ..dora.forward import guard_peft_norms

        guard_peft_norms(model)  # base rows of norm 0: PEFT's forward as prefopt trains it (scale 0, not NaN)
    if fast:
        from ..dora.forward import enable_fast_dora

        enable_fast_dora(model, dora_dropout)
    root = model.get_base_model()
    return root, root.get_decoder(), fast


def _probes(out_dir: Path, probe_rows, dev):
    tok = load_tokenizer(str(out_dir))
    texts, source = probe_texts(tok, probe_rows, n=PROBES)
    tok.truncation_side = "left"  # the end of each probe: the answer, where the adapter matters
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=PROBE_TOKENS).to(dev)
    return enc, len(texts), source


class _Head:
    """The head matrix in its file, read a slice of the vocabulary at a time and cast (compare's Matrix
    interface): never whole in memory."""

    def __init__(self, files, key: str, cast, dev):
        self.files, self.key, self.cast, self.dev = files, key, cast, dev
        self.shape = files.entries[key].shape

    def __getitem__(self, rows: slice):
        return self.cast(self.files.row_range(self.key, rows.start or 0, rows.stop).to(self.dev))


def merge_verified(adapter, base_dir: Path, files: list[str], out_dir: Path, *, info: dict, base_mode: str,
                   out_dtype: str, probe_rows, thresholds, merge, dora_impl: str, dora_dropout: str,
                   peft_forward: bool | None = None, echo=print) -> tuple[dict, dict]:
    """Merge into out_dir (which already holds config.json and the tokenizer) and verify. `merge(on_start=,
    on_written=, stop=)` writes the merged checkpoint (stream.stream_merge, bound by the caller); it runs in a thread
    of its own. peft_forward: None is auto (on for a base under PEFT_AUTO_MAX_BYTES). Returns (counts and the time
    split, the verification report)."""
    t0 = time.perf_counter()
    src = Source(base_dir, files)
    merger = None
    switch = sys.getswitchinterval()
    try:
        refuse_misfits(adapter, src)
        merger = _Merger(merge, echo)
        # the merge runs while this thread imports transformers and PEFT and builds the adapter model: Python code
        # that holds the GIL for its default 5 ms slices, which would starve the merge's short Python steps
        # between its (GIL-free) torch kernels; handed over every 10 us instead, the merge hides behind the imports
        if OVERLAP:
            sys.setswitchinterval(1e-5)
            merger.start()
        else:
            merger.run()
        if peft_forward is None:
            peft_forward = sum(e.nbytes for e in src.entries.values()) < PEFT_AUTO_MAX_BYTES
        counts, verification = _merge_and_verify(adapter, src, merger, out_dir, info=info, base_mode=base_mode,
                                                 out_dtype=out_dtype, probe_rows=probe_rows, thresholds=thresholds,
                                                 dora_impl=dora_impl, dora_dropout=dora_dropout,
                                                 peft_forward=peft_forward, switch=switch)
    except BaseException:
        if merger is not None:
            merger.stop = True
            if merger.is_alive():
                merger.join()
        raise
    finally:
        sys.setswitchinterval(switch)
        src.close()
        if merger is not None and merger.writer is not None:
            merger.writer.files.close()
    total = time.perf_counter() - t0
    counts["time_s"] = {"merge": round(merger.seconds, 2), "verification": round(total - counts.pop("_waited"), 2),
                        "total": round(total, 2)}
    return counts, verification


def refuse_misfits(adapter, src: Source) -> None:
    missing = [k for k in adapter.modules if k not in src.entries]
    if missing:
        raise MergeError(f"adapter does not fit the base: {len(missing)} adapted modules are not in the base "
                         f"(e.g. {missing[0]}); is this the base it was trained on?")
    for key, parts in adapter.modules.items():
        problem = fits(key, src.entries[key].shape, parts)
        if problem:
            raise MergeError(problem)


def _merge_and_verify(adapter, src, merger, out_dir, *, info, base_mode, out_dtype, probe_rows, thresholds,
                      dora_impl, dora_dropout, peft_forward, switch) -> tuple[dict, dict]:
    dev = device()
    enc, n_probes, source = _probes(out_dir, probe_rows, dev)
    root, decoder, fast = _skeleton(adapter.folder, base_dir_of(src), dev, dora_impl=dora_impl,
                                    dora_dropout=dora_dropout)
    t0 = time.perf_counter()
    if merger.is_alive():
        merger.join()  # (the forward's matmuls and the merge's on two cores at once slow both down: one after other)
    waited = time.perf_counter() - t0
    sys.setswitchinterval(switch)
    if merger.error is not None:
        raise merger.error
    writer = merger.writer
    n_peft = min(PEFT_PROBES, n_probes) if fast and peft_forward else 0
    sizes = [n_probes, n_probes] + ([n_peft] if n_peft else [])
    merger.progress.layers = getattr(root.config, "num_hidden_layers", 0)
    state = _Pass(src=src, writer=writer, merger=merger, adapter=adapter, info=info, base_mode=base_mode, dev=dev,
                  sizes=sizes, peft=bool(n_peft), progress=merger.progress)
    state.waited = waited
    embed_key = _key_of(root, root.get_input_embeddings())
    hidden = _forward(state, root, decoder, enc, embed_key)
    mask = enc["attention_mask"].bool()
    head_key = _key_of(root, root.get_output_embeddings())
    head_key = head_key if head_key in src.entries else embed_key  # tied: the head is the embedding matrix
    figures = _logits(state, head_key, hidden, mask, sizes)
    problems = writer.read_back() + _config_problems(out_dir, base_dir_of(src))
    unexercised = [k for k in adapter.modules if k not in state.exercised]
    metrics = {"probes": n_probes, "probe_source": source, **figures["trained"],
               "reference": "prefopt's fast DoRA forward (as trained)" if fast else "the adapter model",
               "method": "the merged model read back from its files, run beside the adapter model as trained: "
                         "every adapted layer checked, logits compared end to end"}
    if "peft" in figures:
        metrics["peft_forward"] = {**figures["peft"], "probes": n_peft}
    metrics["device"] = str(dev)
    limit = layer_limit(out_dtype)
    metrics["layers"] = {"checked": state.checked, "max_rel_diff": state.worst, "worst": state.worst_key,
                         "limit": limit}
    metrics["read_back"] = {"tensors": len(writer.places), "problems": problems[:10]}
    failures = _failures(metrics, thresholds, limit, unexercised, problems)
    counts = {**merger.result, "_waited": state.waited}
    return counts, {**metrics, "thresholds": asdict(thresholds), "passed": not failures, "failures": failures}


def _config_problems(out_dir: Path, base_dir: Path) -> list[str]:
    """The merged folder's config.json is the base's, but for its dtype and quantization (the verification built
    the merged half from the base's config: a wrong config copied would not show in its figures)."""
    import json

    drop = ("dtype", "torch_dtype", "quantization_config")
    try:
        ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out_dir, base_dir))
    except (OSError, ValueError) as e:
        return [f"config.json: {e}"]
    differ = sorted(k for k in set(ours) | set(theirs) if k not in drop and ours.get(k) != theirs.get(k))
    return [f"config.json differs from the base's in {', '.join(differ)}"] if differ else []


def base_dir_of(src: Source) -> Path:
    return next(iter(src.entries.values())).file.parent


def _forward(state: _Pass, root, decoder, enc, embed_key: str):
    """One forward of [trained; merged; (PEFT)] through the weightless model, every unit's tensors read and set as
    it runs; returns the final hidden states (fp32) of the whole batch."""
    import torch

    ids = enc["input_ids"]
    uniq = sorted(set(ids.flatten().tolist()))
    where = {t: j for j, t in enumerate(uniq)}
    index = torch.tensor([where[t] for t in ids.flatten().tolist()], device=state.dev)
    rows = state.src.rows(embed_key, uniq).to(state.dev)
    ref = state.as_trained(embed_key, rows, root.get_input_embeddings())[index].reshape(*ids.shape, -1)
    state.merger.wait(embed_key)
    merged = state.writer.files.rows(embed_key, uniq).to(state.dev).float()[index].reshape(*ids.shape, -1)
    embeds = [ref, merged] + ([ref[: state.sizes[2]]] if state.peft else [])
    masks = [enc["attention_mask"]] * 2 + ([enc["attention_mask"][: state.sizes[2]]] if state.peft else [])
    undo = []
    for unit, prefix in _units(root, decoder):
        names = [n for n, p in unit.named_parameters() if p.device.type == "meta"]
        orig = unit.forward

        def forward(x, *args, unit=unit, prefix=prefix, names=names, orig=orig, **kwargs):
            return state.run_unit(unit, prefix, names, orig, x, args, kwargs)

        unit.forward = forward
        undo.append(unit)
    try:
        with torch.no_grad():
            out = decoder(inputs_embeds=torch.cat(embeds), attention_mask=torch.cat(masks), use_cache=False)
    finally:
        for unit in undo:
            unit.__dict__.pop("forward", None)
    return out.last_hidden_state.float()


def _logits(state: _Pass, head_key: str, hidden, mask, sizes) -> dict:
    """The head, as trained and as written (read once each), and the logits compared."""
    import torch

    h = hidden.split(sizes, dim=0)
    state.merger.wait(head_key)
    w_t = _Head(state.src, head_key, lambda t, d=state.train_dtype: t.to(d).to(torch.float32), state.dev)
    w_m = _Head(state.writer.files, head_key, lambda t: t.to(torch.float32), state.dev)
    figures = {"trained": compare(h[0], w_t, h[1], w_m, mask)}
    if state.peft:
        k = sizes[2]
        peft = compare(h[2], w_t, h[1][:k], w_m, mask[:k])
        between = compare(h[0][:k], w_t, h[2], w_t, mask[:k])
        figures["peft"] = {**{x: peft[x] for x in ("max_abs_logit_diff", "max_rel_logit_diff", "mean_kl",
                                                   "top1_agreement")},
                           "max_abs_logit_diff_vs_trained": between["max_abs_logit_diff"]}
    return figures


def _failures(m: dict, thresholds, limit: float, unexercised: list[str], problems: list[str]) -> list[str]:
    """Every way the merge fails its verification (written so that a NaN figure fails)."""
    failures = []
    if not m["max_rel_logit_diff"] <= thresholds.max_rel_logit_diff:
        failures.append(f"max relative logit diff {m['max_rel_logit_diff']:.3g} > {thresholds.max_rel_logit_diff}")
    if not m["mean_kl"] <= thresholds.mean_kl:
        failures.append(f"mean KL {m['mean_kl']:.3g} > {thresholds.mean_kl}")
    if not m["top1_agreement"] >= thresholds.min_top1_agreement:
        failures.append(f"top-1 agreement {m['top1_agreement']:.3f} < {thresholds.min_top1_agreement}")
    layers = m["layers"]
    if not layers["max_rel_diff"] <= limit:
        failures.append(f"layer {layers['worst']}: the merged weight's output differs from the adapter's by "
                        f"{layers['max_rel_diff']:.3g} (relative; the limit for this dtype is {limit:.3g})")
    if unexercised:
        failures.append(f"{len(unexercised)} adapted tensors were not run by the probe forward, so not checked "
                        f"(e.g. {unexercised[0]})")
    if problems:
        failures.append(f"read back from the written files: {'; '.join(problems[:3])}"
                        + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return failures
