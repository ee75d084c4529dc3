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
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


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
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        b, e = v["data_offsets"]
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


SAMPLED_ROWS = 4  # rows of every written tensor kept to compare with what the file holds afterwards


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
        self.samples: dict[str, tuple[list[int], object]] = {}
        self.bytes_written = 0
        self.files = Files({k: e for k, (_, e) in self.places.items()})  # the output as written so far, to read

    def dtype_of(self, key: str) -> str:
        return self.places[key][1].dtype

    def write(self, key: str, t) -> None:
        """Write the tensor at its place (it must have the planned dtype and shape)."""
        import torch

        i, e = self.places[key]
        t = t.detach().to("cpu").contiguous()
        if dtype_name(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
            raise MergeError(f"merge: {key} came out {dtype_name(t.dtype)} {tuple(t.shape)}, planned {e.dtype} "
                             f"{e.shape} (a bug, please report it)")
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        done = 0
        while done < e.nbytes:
            done += os.pwrite(self.fds[i], view[done:], e.start + done)
        if key not in self.written:
            self.written.add(key)
            self.bytes_written += e.nbytes

    def copy(self, key: str, src: Entry) -> None:
        """A tensor whose bytes are the base's as they are (same dtype): copied file to file by the kernel."""
        import torch

        i, e = self.places[key]
        with open(src.file, "rb") as f:
            done = 0
            while done < e.nbytes:
                n = os.copy_file_range(f.fileno(), self.fds[i], e.nbytes - done, src.start + done, e.start + done) \
                    if hasattr(os, "copy_file_range") else 0
                if n <= 0:  # no copy_file_range here (or a file system without it): through memory
                    f.seek(src.start + done)
                    chunk = f.read(min(e.nbytes - done, 64 << 20))
                    n = os.pwrite(self.fds[i], chunk, e.start + done)
                done += n
        rows_n = e.shape[0] if e.shape else 0
        picks = sorted({0, rows_n // 3, 2 * rows_n // 3, rows_n - 1}) if rows_n and e.nbytes else []
        if picks:
            width = e.nbytes // rows_n
            buf = torch.empty((len(picks), width), dtype=torch.uint8)
            with open(src.file, "rb") as f:
                for j, r in enumerate(picks):
                    f.seek(src.start + r * width)
                    f.readinto(memoryview(buf[j].numpy()))
            self.samples[key] = (picks, buf.view(torch_dtype_of(e.dtype)).reshape(len(picks), -1))
        else:
            self.samples[key] = ([], None)
        if key not in self.written:
            self.written.add(key)
            self.bytes_written += e.nbytes

    def sample(self, key: str, t) -> None:
        """Keep a few rows of the tensor meant for this key (the caller's, not what write() was given): read_back
        compares the file with them."""
        t = t.detach().to("cpu")
        rows = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(0, 1)
        picks = sorted({0, rows.shape[0] // 3, 2 * rows.shape[0] // 3, rows.shape[0] - 1}) if rows.numel() else []
        self.samples[key] = (picks, rows[picks].clone() if picks else None)

    def close(self) -> dict:
        """Close the shards and write the index (several shards); the files are complete only when every planned
        tensor was written."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.files.close()
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
        """Every tensor's sampled rows as the safetensors library reads them from the finished files, against what
        was written: a tensor under another key, transposed, cut short or overwritten shows here."""
        import torch
        from safetensors import safe_open

        problems = []
        for name in self.names:
            with safe_open(str(self.out_dir / name), framework="pt") as f:
                for key in f.keys():
                    if key not in self.samples:
                        problems.append(f"{key}: written, but nothing was merged for it")
                        continue
                    picks, want = self.samples[key]
                    sl = f.get_slice(key)
                    if tuple(sl.get_shape()) != self.places[key][1].shape:
                        problems.append(f"{key}: the file holds shape {tuple(sl.get_shape())}")
                        continue
                    if not picks:
                        continue
                    got = torch.cat([f.get_slice(key)[r:r + 1].reshape(1, -1) for r in picks])
                    if not torch.equal(got.view(torch.uint8) if got.dtype != torch.bool else got,
                                       want.view(torch.uint8) if want.dtype != torch.bool else want):
                        problems.append(f"{key}: the file does not hold the tensor merged for it")
        return problems
