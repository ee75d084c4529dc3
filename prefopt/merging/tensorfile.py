"""Safetensors files read and written by place, for the verified merge: a tensor read by its byte range (no memory
map held, two threads may read at once), every output tensor written at its planned offset in its output shard, in
any order, with no shard held in memory (tensors left as they are copied file to file); afterwards a read-back of
sampled rows of every tensor through the safetensors library.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length, the JSON header
(dtype, shape, data_offsets per tensor; `__metadata__`), then the tensors' bytes, back to back in offset order.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergeError

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def torch_dtype_of(name: str):
    import torch

    if name not in _DTYPES:
        raise MergeError(f"tensor dtype {name} is not supported by the streaming merge")
    return getattr(torch, _DTYPES[name])


def dtype_name(dtype) -> str:
    short = str(dtype).removeprefix("torch.")
    return next(k for k, v in _DTYPES.items() if v == short)


@dataclass
class Entry:
    """One tensor in a file: its dtype (safetensors' name), shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, Entry]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    size = os.path.getsize(path)
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        b, e = v["data_offsets"]
        if base + e > size:
            raise MergeError(f"{path}: cut short: {key} ends at byte {base + e:,}, the file has {size:,} (a partial "
                             "download or copy?); fetch the checkpoint again")
        out[key] = Entry(Path(path), v["dtype"], tuple(v["shape"]), base + b, base + e)
    return out


class Files:
    """Tensors of safetensors files by their byte ranges (`entries`), read with os.preadv: no memory map held, no
    shared file position (two threads may read at once)."""

    def __init__(self, entries: dict[str, Entry]):
        self.entries = entries
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _pread(self, key: str, e: Entry, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd(e.file), [view[done:]], offset + done)
            if n <= 0:
                raise MergeError(f"{e.file}: {key} is cut short (the file is smaller than its header says)")
            done += n

    def read(self, key: str, out=None):
        """The tensor, read into `out` (a uint8 buffer of its size) or a buffer of its own."""
        import torch

        e = self.entries[key]
        out = torch.empty(e.nbytes, dtype=torch.uint8) if out is None else out.reshape(-1)
        if e.nbytes:
            self._pread(key, e, memoryview(out.numpy()), e.start)
        return out.view(torch_dtype_of(e.dtype)).reshape(e.shape)

    def row_range(self, key: str, start: int, stop: int):
        """Rows start..stop of a tensor (a slice of the head, a block of a large tensor), read in one go."""
        import torch

        e = self.entries[key]
        stop = min(stop, e.shape[0])
        width = e.nbytes // e.shape[0]
        out = torch.empty((stop - start) * width, dtype=torch.uint8)
        if out.numel():
            self._pread(key, e, memoryview(out.numpy()), e.start + start * width)
        return out.view(torch_dtype_of(e.dtype)).reshape(stop - start, *e.shape[1:])

    def rows(self, key: str, ids: list[int]):
        """Rows of a 2-D tensor (the embedding's rows for the probe tokens), read one by one."""
        import torch

        e = self.entries[key]
        width = e.nbytes // e.shape[0]
        out = torch.empty((len(ids), width), dtype=torch.uint8)
        for j, i in enumerate(ids):
            self._pread(key, e, memoryview(out[j].numpy()), e.start + i * width)
        return out.view(torch_dtype_of(e.dtype)).reshape(len(ids), *e.shape[1:])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class Source(Files):
    """The base checkpoint's tensors, in file order."""

    def __init__(self, folder: Path, files: list[str]):
        entries: dict[str, Entry] = {}
        for name in files:
            found = read_header(Path(folder) / name)
            entries.update(dict(sorted(found.items(), key=lambda kv: kv[1].start)))
        super().__init__(entries)


class Writer:
    """Output shards planned up front (the base's tensor order, shards of at most max_shard_bytes, as stream_merge
    writes them), each tensor written at its offset when it is ready: `plan` is [(key, dtype name, shape)]."""

    def __init__(self, out_dir: Path, plan: list[tuple[str, str, tuple]], max_shard_bytes: int):
        import math

        self.out_dir = Path(out_dir)
        shards: list[list] = [[]]
        size = 0
        for key, dt, shape in plan:
            nbytes = math.prod(shape) * torch_dtype_of(dt).itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, dt, shape, nbytes))
            size += nbytes
        single = len(shards) == 1
        self.names = ["model.safetensors"] if single else [f"model-{i + 1:05d}.safetensors" for i in
                                                             range(len(shards))]
        self.places: dict[str, tuple[int, Entry]] = {}
        self.fds = []
        self.total = 0
        for i, (name, items) in enumerate(zip(self.names, shards)):
            header, off = {"__metadata__": {"format": "pt"}}, 0
            # the widest items first (as safetensors' save_file): every tensor starts aligned to its item size
            items.sort(key=lambda it: -torch_dtype_of(it[1]).itemsize)
            for key, dt, shape, nbytes in items:
                header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            base = 8 + len(text)
            fd = os.open(self.out_dir / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(text)) + text, 0)
            os.ftruncate(fd, base + off)
            self.fds.append(fd)
            for key, dt, shape, nbytes in items:
                b = header[key]["data_offsets"][0]
                self.places[key] = (i, Entry(self.out_dir / name, dt, tuple(shape), base + b, base + b + nbytes))
            self.total += off
        self.written: set[str] = set()
        self.samples: dict[str, dict[int, object]] = {}  # key -> row -> that row as merged
        self.bytes_written = 0
        self.kernel_copy = hasattr(os, "copy_file_range")
        self.covered: dict[str, int] = {}
        self.files = Files({k: e for k, (_, e) in self.places.items()})  # the output as written so far, to read

    def dtype_of(self, key: str) -> str:
        return self.places[key][1].dtype

    def write(self, key: str, t, row0: int = 0) -> None:
        """Write the tensor at its place (the planned dtype and shape), or a block of its rows starting at row0."""
        import torch

        i, e = self.places[key]
        t = t.detach().to("cpu").contiguous()
        whole = row0 == 0 and tuple(t.shape) == e.shape
        if dtype_name(t.dtype) != e.dtype or not (whole or (
                t.dim() == len(e.shape) and tuple(t.shape[1:]) == e.shape[1:] and row0 + t.shape[0] <= e.shape[0])):
            raise MergeError(f"merge: {key} came out {dtype_name(t.dtype)} {tuple(t.shape)} at row {row0}, planned "
                             f"{e.dtype} {e.shape} (a bug, please report it)")
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        start = e.start + (row0 * (e.nbytes // e.shape[0]) if row0 else 0)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fds[i], view[done:], start + done)
        self._covered(key, e, len(view))

    def _covered(self, key: str, e: Entry, nbytes: int) -> None:
        self.covered[key] = self.covered.get(key, 0) + nbytes
        if key not in self.written and self.covered[key] >= e.nbytes:
            self.written.add(key)
            self.bytes_written += e.nbytes

    def copy(self, key: str, src: Entry) -> None:
        """A tensor whose bytes are the base's as they are (same dtype): copied file to file by the kernel where it
        can (copy_file_range), else through a bounded buffer."""
        import torch

        i, e = self.places[key]
        with open(src.file, "rb") as f:
            done = 0
            while done < e.nbytes:
                n = 0
                if self.kernel_copy:
                    try:
                        n = os.copy_file_range(f.fileno(), self.fds[i], e.nbytes - done, src.start + done,
                                               e.start + done)
                    except OSError:  # another file system (EXDEV), or one without it: through memory from now on
                        self.kernel_copy = False
                if n <= 0:
                    chunk = os.pread(f.fileno(), min(e.nbytes - done, 64 << 20), src.start + done)
                    if not chunk:
                        raise MergeError(f"{src.file}: {key} is cut short (the file is smaller than its header says)")
                    n = os.pwrite(self.fds[i], chunk, e.start + done)
                done += n
        rows = self.samples.setdefault(key, {})
        width = e.nbytes // e.shape[0] if e.shape and e.nbytes else 0
        for r in _picks(e.shape) if width else []:
            row = torch.frombuffer(bytearray(os.pread(self.files._fd(src.file), width, src.start + r * width)),
                                   dtype=torch.uint8)
            rows[r] = row.view(torch_dtype_of(e.dtype)).reshape(1, -1)
        self._covered(key, e, e.nbytes)

    def sample(self, key: str, t, row0: int = 0) -> None:
        """Keep a few rows of the tensor meant for this key (the caller's, not what write() was given), or of a
        block of its rows starting at row0: read_back compares the file with them."""
        rows = self.samples.setdefault(key, {})
        if not t.dim() or not t.numel():  # a 0-dim or empty tensor: nothing to sample (the shape is still checked)
            return
        flat = t.detach().reshape(t.shape[0], -1)
        for r in _picks(self.places[key][1].shape):
            if row0 <= r < row0 + t.shape[0]:
                rows[r] = flat[r - row0: r - row0 + 1].to("cpu", copy=True)  # a row off the device

    def close(self) -> dict:
        """Close the shards and write the index (several shards); the files are complete only when every planned
        tensor was written."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        missing = [k for k in self.places if k not in self.written]
        if missing:
            raise MergeError(f"merge: {len(missing)} tensors were never written (e.g. {missing[0]}; a bug, please "
                             "report it)")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: self.names[i] for k, (i, _) in self.places.items()}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return {"shards": len(self.names), "bytes": self.total}

    def abandon(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.files.close()

    def read_back(self) -> list[str]:
        """Every tensor's sampled rows as the safetensors library reads them from the finished files (found through
        the index when there are several), against what was merged for that key: a tensor under another key,
        transposed, cut short, overwritten or missing from the index shows here."""
        import torch
        from safetensors import safe_open

        index = self.out_dir / "model.safetensors.index.json"
        where = json.loads(index.read_text())["weight_map"] if index.is_file() else \
            {k: self.names[0] for k in self.places}
        problems = [f"{k}: not in the index" for k in self.places if k not in where]
        for name in sorted(set(where.values())):
            with safe_open(str(self.out_dir / name), framework="pt") as f:
                for key in f.keys():
                    if where.get(key) != name:
                        continue
                    if key not in self.samples:
                        problems.append(f"{key}: written, but nothing was merged for it")
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != self.places[key][1].shape:
                        problems.append(f"{key}: the file holds shape {shape}")
                        continue
                    for r, want in sorted(self.samples[key].items()):
                        got = f.get_slice(key)[r:r + 1].reshape(1, -1)
                        if not torch.equal(got.view(torch.uint8) if got.dtype != torch.bool else got,
                                           want.view(torch.uint8) if want.dtype != torch.bool else want):
                            problems.append(f"{key}: the file does not hold the tensor merged for it")
                            break
        return problems


def _picks(shape: tuple) -> list[int]:
    """The rows of a tensor kept to compare with the file: first, two inner, last."""
    n = shape[0] if shape else 0
    return sorted({0, n // 3, 2 * n // 3, n - 1}) if n else []
