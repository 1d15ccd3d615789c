"""Loader files: a columnar container the training loop reads by memory map.

Layout (little-endian; the full description and a reference reader are in docs/formats.md):

    bytes 0..7     magic  b"PVLOADER"
    bytes 8..9     format version (uint16, currently 2; version 1 files are still read)
    bytes 10..13   header length H (uint32)
    bytes 14..14+H header: UTF-8 JSON {"num_examples", "fields": [...], "attrs": {...}}
    ...            the fields' blocks, each starting at a 64-byte aligned offset

A *fixed* field stores one fixed-size row per example (uint8 H x W x C images, ints, floats,
fixed-shape arrays): example i is one memory-mapped slice.  A *bytes* field stores
variable-size values (JPEG/PNG bytes, raw bytes, UTF-8 ids) as an offsets block (uint64, n + 1
entries) and a data block.  Every block carries a CRC-32 that the reader verifies.  A field
named ``id`` (bytes, UTF-8) gives random access by example id.  Nothing here knows Dagster.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

MAGIC = b"PVLOADER"
VERSION = 2
READABLE = (1, 2)
ALIGN = 64
_PREFIX = struct.Struct("<8sHI")


class LoaderFileError(ValueError):
    """A loader file is missing, truncated, corrupt, or not what the reader expected."""


def _crc(buf) -> int:
    crc = 0
    mv = memoryview(np.ascontiguousarray(buf)).cast("B") if not isinstance(buf, (bytes, bytearray)) \
        else memoryview(buf)
    step = 1 << 24
    for start in range(0, len(mv), step):
        crc = zlib.crc32(mv[start:start + step], crc)
    return crc & 0xFFFFFFFF


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _as_blocks(name, value):
    """A field's value -> (descriptor without offsets, list of blocks to write)."""
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        if a.ndim == 0:
            raise LoaderFileError(f"field {name!r} is a scalar; every field needs one row per example")
        if a.dtype.hasobject:
            raise LoaderFileError(f"field {name!r} has dtype object; store variable-size values as bytes")
        return {"name": name, "kind": "fixed", "dtype": a.dtype.str, "shape": list(a.shape[1:]),
                "nbytes": int(a.nbytes), "crc32": _crc(a) if a.nbytes else 0}, [a], len(a)
    items = []
    for v in value:
        if isinstance(v, str):
            v = v.encode()
        elif not isinstance(v, (bytes, bytearray, memoryview)):   # bytes(3) would be three zero bytes
            raise LoaderFileError(f"field {name!r}: a bytes field holds bytes or str values, got "
                                  f"{type(v).__name__}; pass numbers as a NumPy array")
        items.append(bytes(v))
    offsets = np.zeros(len(items) + 1, np.uint64)
    np.cumsum([len(v) for v in items], out=offsets[1:])
    data = b"".join(items)
    return {"name": name, "kind": "bytes", "nbytes": len(data), "crc32": _crc(data),
            "index_nbytes": int(offsets.nbytes), "index_crc32": _crc(offsets)}, [offsets, data], len(items)


def write_loader_file(path: str | os.PathLike, fields: Mapping[str, np.ndarray | Sequence[bytes]],
                      attrs: Mapping | None = None) -> Path:
    """Write ``fields`` atomically to ``path``.

    A NumPy array is a fixed field (first axis = examples); a sequence of ``bytes``/``str`` is a
    bytes field.  All fields need the same number of examples.
    """
    path = Path(path)
    if not fields:
        raise LoaderFileError("a loader file needs at least one field")
    descs, blocks, n = [], [], None
    for name, value in fields.items():
        d, bl, length = _as_blocks(name, value)
        if n is None:
            n = length
        elif length != n:
            raise LoaderFileError(f"field {name!r} has {length} rows but the first field has {n}")
        descs.append(d)
        blocks.append(bl)
    # offsets depend on the header's length, which depends on the offsets' digits: iterate
    header_len = 0
    for _ in range(5):
        offset = _round_up(_PREFIX.size + header_len, ALIGN)
        for d in descs:
            if d["kind"] == "bytes":
                d["index_offset"] = offset
                offset = _round_up(offset + d["index_nbytes"], ALIGN)
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
            for d, bl in zip(descs, blocks):
                starts = [d["index_offset"], d["offset"]] if d["kind"] == "bytes" else [d["offset"]]
                for start, block in zip(starts, bl):
                    f.write(b"\0" * (start - f.tell()))
                    f.write(memoryview(block).cast("B") if isinstance(block, np.ndarray) and block.nbytes
                            else (block if isinstance(block, bytes) else b""))
            f.write(b"\0" * (offset - f.tell()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def convert(items: Sequence, path: str | os.PathLike, to_fields: Callable[[object], dict],
            workers: int | None = None, chunk: int = 256, attrs: Mapping | None = None) -> Path:
    """Convert any indexable dataset (a torchvision dataset, a list, ...) in parallel.

    ``to_fields(item)`` turns one item into {field: value} (an array row, or bytes for a bytes
    field); chunks of items are converted on a thread pool (PIL decoding and encoding release the
    GIL), then written at once, atomically.
    """
    n = len(items)
    workers = workers or os.cpu_count() or 1

    def run(start):
        return [to_fields(items[i]) for i in range(start, min(n, start + chunk))]

    with ThreadPoolExecutor(workers) as pool:
        rows = [r for part in pool.map(run, range(0, n, chunk)) for r in part]
    if not rows:
        raise LoaderFileError("nothing to convert: the dataset is empty")
    fields = {}
    for name, first in rows[0].items():
        if isinstance(first, (bytes, bytearray, str)):
            fields[name] = [r[name] for r in rows]
        else:
            try:
                fields[name] = np.stack([np.asarray(r[name]) for r in rows])
            except ValueError as e:
                raise LoaderFileError(f"field {name!r}: rows differ in shape ({e}); resize them or "
                                      f"store encoded bytes") from None
    return write_loader_file(path, fields, attrs)


@dataclass(frozen=True)
class FieldInfo:
    name: str
    kind: str            # fixed | bytes
    dtype: np.dtype
    shape: tuple
    offset: int
    nbytes: int
    crc32: int
    index_offset: int = 0
    index_nbytes: int = 0
    index_crc32: int = 0


class LoaderFile:
    """Reader: validates the header, then exposes fields as read-only memory maps."""

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
            if version not in READABLE:
                raise LoaderFileError(f"{self.path}: format version {version}, this reader knows {READABLE}")
            raw = f.read(header_len)
        if len(raw) < header_len:
            raise LoaderFileError(f"{self.path}: truncated inside the header")
        try:
            header = json.loads(raw)
            self.num_examples = int(header["num_examples"])
            descs = header["fields"]
        except (ValueError, KeyError, TypeError) as e:
            raise LoaderFileError(f"{self.path}: corrupt header ({e})") from None
        self.version = version
        self.attrs = header.get("attrs", {})
        self.fields: dict[str, FieldInfo] = {}
        for d in descs:
            kind = d.get("kind", "fixed")
            info = FieldInfo(d["name"], kind, np.dtype(d.get("dtype", "|u1")), tuple(d.get("shape", ())),
                             int(d["offset"]), int(d["nbytes"]), int(d["crc32"]), int(d.get("index_offset", 0)),
                             int(d.get("index_nbytes", 0)), int(d.get("index_crc32", 0)))
            if kind == "fixed":
                expect = self.num_examples * int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
                if expect != info.nbytes:
                    raise LoaderFileError(f"{self.path}: field {info.name!r} declares {info.nbytes} bytes, "
                                          f"its shape and dtype need {expect}")
            elif kind == "bytes":
                if info.index_nbytes != 8 * (self.num_examples + 1):
                    raise LoaderFileError(f"{self.path}: bytes field {info.name!r} has a malformed offsets block")
                if info.index_offset + info.index_nbytes > size:
                    raise LoaderFileError(f"{self.path}: truncated: offsets of {info.name!r} end past the file")
            else:
                raise LoaderFileError(f"{self.path}: field {info.name!r} has unknown kind {kind!r}")
            if info.offset + info.nbytes > size:
                raise LoaderFileError(f"{self.path}: truncated: field {info.name!r} ends at byte "
                                      f"{info.offset + info.nbytes} but the file has {size}")
            self.fields[info.name] = info
        self._maps: dict[str, np.ndarray] = {}
        self._ids: dict[str, int] | None = None
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.num_examples

    def _field(self, name: str) -> FieldInfo:
        if name not in self.fields:
            raise LoaderFileError(f"{self.path}: no field {name!r} (fields: {sorted(self.fields)})")
        return self.fields[name]

    def _map(self, key, dtype, offset, shape):
        if key not in self._maps:
            if int(np.prod(shape)) == 0:
                self._maps[key] = np.zeros(shape, dtype)
            else:
                self._maps[key] = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return self._maps[key]

    def array(self, name: str) -> np.ndarray:
        """A fixed field as a read-only memory map [num_examples, *shape]."""
        info = self._field(name)
        if info.kind != "fixed":
            raise LoaderFileError(f"{self.path}: field {name!r} holds variable-size bytes; use take_bytes")
        return self._map(name, info.dtype, info.offset, (self.num_examples, *info.shape))

    def _offsets(self, name: str) -> np.ndarray:
        info = self._field(name)
        if info.kind != "bytes":
            raise LoaderFileError(f"{self.path}: field {name!r} is fixed-size; use array or take")
        offs = self._map(name + "#offsets", np.uint64, info.index_offset, (self.num_examples + 1,))
        return offs

    def _data(self, name: str) -> np.ndarray:
        info = self.fields[name]
        return self._map(name + "#data", np.uint8, info.offset, (info.nbytes,))

    def take_bytes(self, name: str, indices) -> list[bytes]:
        offs, data = self._offsets(name), self._data(name)
        idx = self._check(indices)
        return [data[int(offs[i]):int(offs[i + 1])].tobytes() for i in idx]

    def verify(self) -> None:
        for name, info in self.fields.items():
            if info.kind == "bytes":
                offs = self._offsets(name)
                if _crc(offs) != info.index_crc32:
                    raise LoaderFileError(f"{self.path}: checksum mismatch in the offsets of {name!r}: "
                                          f"the file is corrupt")
                if len(offs) and (offs[0] != 0 or offs[-1] != info.nbytes or np.any(np.diff(offs.astype(np.int64)) < 0)):
                    raise LoaderFileError(f"{self.path}: the offsets of {name!r} are inconsistent")
                blocks = [self._data(name)] if info.nbytes else []
            else:
                blocks = [self.array(name)] if info.nbytes else []
            for block in blocks:
                if _crc(block) != info.crc32:
                    raise LoaderFileError(f"{self.path}: checksum mismatch in field {name!r}: the file is corrupt")

    def check_schema(self, expected: Mapping[str, tuple[str, tuple]]) -> None:
        """Raise unless each expected fixed field exists with the given dtype and per-example shape."""
        for name, (dtype, shape) in expected.items():
            if name not in self.fields:
                raise LoaderFileError(f"{self.path}: schema mismatch: field {name!r} is missing")
            info = self.fields[name]
            if info.kind != "fixed" or info.dtype != np.dtype(dtype) or tuple(info.shape) != tuple(shape):
                got = "bytes" if info.kind == "bytes" else f"{info.dtype}{list(info.shape)}"
                raise LoaderFileError(f"{self.path}: schema mismatch in {name!r}: file has {got}, "
                                      f"expected {np.dtype(dtype)}{list(shape)}")

    def _check(self, indices) -> np.ndarray:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
            bad = idx[(idx < 0) | (idx >= self.num_examples)][0]
            raise LoaderFileError(f"{self.path}: index {int(bad)} out of range [0, {self.num_examples})")
        return idx

    def take(self, name: str, indices) -> np.ndarray:
        idx = self._check(indices)
        return np.asarray(self.array(name)[idx])

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        """Positions of examples by their ``id`` field (random access by example id)."""
        if self._ids is None:
            all_ids = self.take_bytes("id", np.arange(self.num_examples))
            self._ids = {v.decode(): i for i, v in enumerate(all_ids)}
        missing = [i for i in ids if i not in self._ids]
        if missing:
            raise LoaderFileError(f"{self.path}: no example with id {missing[0]!r}")
        return np.array([self._ids[i] for i in ids], np.int64)
