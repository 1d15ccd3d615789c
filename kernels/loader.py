"""Loader files: a small columnar container the training loop reads by memory map.

Layout (little-endian; full description in docs/formats.md):

    bytes 0..7     magic  b"PVLOADER"
    bytes 8..9     format version (uint16, currently 1)
    bytes 10..13   header length H (uint32)
    bytes 14..14+H header: UTF-8 JSON  {"num_examples", "fields": [{"name", "dtype",
                   "shape", "offset", "nbytes", "crc32"}], "attrs": {...}}
    ...            each field's block, starting at a 64-byte aligned offset, holding
                   num_examples fixed-size rows in C order.

Every field stores one fixed-size row per example, so example i of a field lives at
``offset + i * row_nbytes``: random access by index is one memory-mapped slice.  A CRC-32
of every block lets a reader prove the file is whole.  This module knows nothing of Dagster.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

MAGIC = b"PVLOADER"
VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sHI")


class LoaderFileError(ValueError):
    """A loader file is missing, truncated, corrupt, or not what the reader expected."""


def _crc(buf) -> int:
    crc = 0
    mv = memoryview(buf).cast("B")
    step = 1 << 24
    for start in range(0, len(mv), step):
        crc = zlib.crc32(mv[start:start + step], crc)
    return crc & 0xFFFFFFFF


def write_loader_file(path: str | os.PathLike, fields: Mapping[str, np.ndarray],
                      attrs: Mapping | None = None) -> Path:
    """Write ``fields`` (name -> array with one row per example) atomically to ``path``."""
    path = Path(path)
    if not fields:
        raise LoaderFileError("a loader file needs at least one field")
    arrays = {name: np.ascontiguousarray(a) for name, a in fields.items()}
    lengths = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
    n = next(iter(lengths.values()))
    for name, length in lengths.items():
        if length is None:
            raise LoaderFileError(f"field {name!r} is a scalar; every field needs one row per example")
        if length != n:
            raise LoaderFileError(f"field {name!r} has {length} rows but the first field has {n}")
        if arrays[name].dtype.hasobject:
            raise LoaderFileError(f"field {name!r} has dtype object; only fixed-size dtypes are stored")

    descs = []
    for name, a in arrays.items():
        descs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape[1:]),
                      "nbytes": int(a.nbytes), "crc32": _crc(a) if a.nbytes else 0})
    # Offsets depend on the header length, which depends on the offsets' digits: iterate.
    header_len = 0
    for _ in range(5):
        offset = _round_up(_PREFIX.size + header_len, ALIGN)
        for d in descs:
            d["offset"] = offset
            offset = _round_up(offset + d["nbytes"], ALIGN)
        header = json.dumps({"num_examples": int(n), "fields": descs, "attrs": dict(attrs or {})},
                            sort_keys=True).encode()
        if len(header) == header_len:
            break
        header_len = len(header)
    else:  # pragma: no cover - converges in two rounds
        raise LoaderFileError("header layout did not converge")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, VERSION, len(header)))
            f.write(header)
            for d, a in zip(descs, arrays.values()):
                f.write(b"\0" * (d["offset"] - f.tell()))
                f.write(memoryview(a).cast("B") if a.nbytes else b"")
            f.write(b"\0" * (offset - f.tell()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class FieldInfo:
    name: str
    dtype: np.dtype
    shape: tuple
    offset: int
    nbytes: int
    crc32: int


class LoaderFile:
    """Reader: validates the header, then exposes each field as a read-only memory map."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise LoaderFileError(f"{self.path}: no such loader file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise LoaderFileError(f"{self.path}: truncated ({size} bytes, shorter than the prefix)")
            magic, version, header_len = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise LoaderFileError(f"{self.path}: not a provenance loader file (magic {magic!r})")
            if version != VERSION:
                raise LoaderFileError(f"{self.path}: format version {version}, this reader knows {VERSION}")
            raw = f.read(header_len)
        if len(raw) < header_len:
            raise LoaderFileError(f"{self.path}: truncated inside the header")
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise LoaderFileError(f"{self.path}: corrupt header ({e})") from None
        self.num_examples = int(header["num_examples"])
        self.attrs = header.get("attrs", {})
        self.fields: dict[str, FieldInfo] = {}
        for d in header["fields"]:
            info = FieldInfo(d["name"], np.dtype(d["dtype"]), tuple(d["shape"]), int(d["offset"]),
                             int(d["nbytes"]), int(d["crc32"]))
            expect = self.num_examples * int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
            if expect != info.nbytes:
                raise LoaderFileError(f"{self.path}: field {info.name!r} declares {info.nbytes} bytes, "
                                      f"its shape and dtype need {expect}")
            if info.offset + info.nbytes > size:
                raise LoaderFileError(f"{self.path}: truncated: field {info.name!r} ends at byte "
                                      f"{info.offset + info.nbytes} but the file has {size}")
            self.fields[info.name] = info
        self._maps: dict[str, np.ndarray] = {}
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.num_examples

    def array(self, name: str) -> np.ndarray:
        if name not in self.fields:
            raise LoaderFileError(f"{self.path}: no field {name!r} (fields: {sorted(self.fields)})")
        if name not in self._maps:
            info = self.fields[name]
            shape = (self.num_examples, *info.shape)
            if info.nbytes == 0:
                self._maps[name] = np.zeros(shape, info.dtype)
            else:
                self._maps[name] = np.memmap(self.path, dtype=info.dtype, mode="r",
                                             offset=info.offset, shape=shape)
        return self._maps[name]

    def verify(self) -> None:
        for name, info in self.fields.items():
            if info.nbytes and _crc(self.array(name)) != info.crc32:
                raise LoaderFileError(f"{self.path}: checksum mismatch in field {name!r}: the file is corrupt")

    def check_schema(self, expected: Mapping[str, tuple[str, tuple]]) -> None:
        """Raise unless each expected field exists with the given dtype and per-example shape."""
        for name, (dtype, shape) in expected.items():
            if name not in self.fields:
                raise LoaderFileError(f"{self.path}: schema mismatch: field {name!r} is missing")
            info = self.fields[name]
            if info.dtype != np.dtype(dtype) or tuple(info.shape) != tuple(shape):
                raise LoaderFileError(f"{self.path}: schema mismatch in {name!r}: file has "
                                      f"{info.dtype}{list(info.shape)}, expected {np.dtype(dtype)}{list(shape)}")

    def take(self, name: str, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            bad = indices[(indices < 0) | (indices >= self.num_examples)][0]
            raise LoaderFileError(f"{self.path}: index {int(bad)} out of range [0, {self.num_examples})")
        return np.asarray(self.array(name)[indices])


def iterate_batches(num_examples: int, batch_size: int, *, indices: np.ndarray | None = None,
                    order: str = "random", seed: int = 0, epoch: int = 0,
                    drop_last: bool = False) -> Iterator[np.ndarray]:
    """Index batches over ``indices`` (default: all examples); random order is seeded by (seed, epoch)."""
    idx = np.arange(num_examples) if indices is None else np.asarray(indices)
    if order == "random":
        idx = idx[np.random.default_rng([seed, epoch]).permutation(len(idx))]
    elif order != "sequential":
        raise ValueError(f"unknown order {order!r}; use 'random' or 'sequential'")
    stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        yield idx[start:start + batch_size]
