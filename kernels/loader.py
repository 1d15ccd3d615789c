"""Loader files: a columnar container the training loop reads by memory map.

Layout (little-endian; the full description and a reference reader are in docs/formats.md):

    bytes 0..7     magic  b"PVLOADER"
    bytes 8..9     format version (uint16, 3)
    bytes 10..13   header length H (uint32)
    bytes 14..17   CRC-32 of the header (uint32)
    bytes 18..18+H header: UTF-8 JSON {"num_examples", "fields": [...], "attrs": {...}}
    ...            the fields' blocks, each starting at a 64-byte aligned offset

A *fixed* field stores one fixed-size row per example (uint8 H x W x C images, ints, floats,
fixed-shape arrays): example i is one memory-mapped slice.  A *bytes* field stores
variable-size values (JPEG/PNG bytes, raw bytes, UTF-8 ids) as an offsets block (uint64, n + 1
entries) and a data block.  The header and every block carry a CRC-32 that the reader verifies,
and the header is validated against everything the format allows (``parse_header``: dtypes,
byte order, shapes, sizes, offsets inside the file and not overlapping, unique names), so a
corrupt or hostile file raises ``LoaderFileError`` naming the file and the problem; it never
returns other data than was written, and never crashes the interpreter.  A field
named ``id`` (bytes, UTF-8) gives random access by example id.  Nothing here knows Dagster.
"""
from __future__ import annotations

import json
import math
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
VERSION = 3
READABLE = (3,)
ALIGN = 64
_PREFIX = struct.Struct("<8sHII")
# what a fixed field may hold: booleans, integers, floats and complex numbers, little-endian
# (or byte-order free); never objects, structured records, strings or datetimes
DTYPES = frozenset(np.dtype(t).str for t in ("?", "i1", "u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4",
                                              "<f8", "<c8", "<c16"))
MAX_DIMS = 16
MAX_HEADER = 1 << 26


class LoaderFileError(ValueError):
    """A loader file is missing, truncated, corrupt, or not what the reader expected."""


def _crc(buf, crc: int = 0) -> int:
    mv = memoryview(np.ascontiguousarray(buf)).cast("B") if not isinstance(buf, (bytes, bytearray)) \
        else memoryview(buf)
    step = 1 << 24
    for start in range(0, len(mv), step):
        crc = zlib.crc32(mv[start:start + step], crc)
    return crc & 0xFFFFFFFF


def _seed(n: int, d: Mapping) -> int:
    """A field's checksums start from the CRC-32 of its description, [num_examples, name, kind,
    dtype, shape] as compact JSON (null for a bytes field's dtype and shape): a header edited to
    read the same bytes as another dtype, shape, length or name fails the block's checksum."""
    desc = [n, d["name"], d["kind"], d.get("dtype"), list(d["shape"]) if "shape" in d else None]
    return zlib.crc32(json.dumps(desc, separators=(",", ":")).encode()) & 0xFFFFFFFF


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _as_blocks(name, value):
    """A field's value -> (descriptor without offsets, list of blocks to write)."""
    if not isinstance(name, str) or not name or "#" in name:
        raise LoaderFileError(f"field name {name!r}: a field needs a non-empty string name without '#'")
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        if a.ndim == 0:
            raise LoaderFileError(f"field {name!r} is a scalar; every field needs one row per example")
        if a.dtype.hasobject:
            raise LoaderFileError(f"field {name!r} has dtype object; store variable-size values as bytes")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype.str not in DTYPES:
            raise LoaderFileError(f"field {name!r} has dtype {a.dtype}; a fixed field holds booleans, integers, "
                                  f"floats or complex numbers (store other values as bytes)")
        if a.ndim - 1 > MAX_DIMS:
            raise LoaderFileError(f"field {name!r} has {a.ndim - 1} dimensions per example; at most {MAX_DIMS}")
        return {"name": name, "kind": "fixed", "dtype": a.dtype.str, "shape": list(a.shape[1:]),
                "nbytes": int(a.nbytes)}, [a], len(a)
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
    return {"name": name, "kind": "bytes", "nbytes": len(data), "index_nbytes": int(offsets.nbytes)}, \
        [offsets, data], len(items)


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
    for d, bl in zip(descs, blocks):
        seed = _seed(n, d)
        if d["kind"] == "fixed":
            d["crc32"] = _crc(bl[0], seed) if bl[0].nbytes else seed
        else:
            d["index_crc32"], d["crc32"] = _crc(bl[0], seed), _crc(bl[1], seed)
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
            f.write(_PREFIX.pack(MAGIC, VERSION, len(header), _crc(header)))
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


_FIXED_KEYS = frozenset({"name", "kind", "dtype", "shape", "offset", "nbytes", "crc32"})
_BYTES_KEYS = frozenset({"name", "kind", "offset", "nbytes", "crc32", "index_offset", "index_nbytes", "index_crc32"})


def parse_header(raw: bytes, size: int, path="<loader file>") -> tuple[int, dict, dict]:
    """(num_examples, {name: FieldInfo}, attrs) from a header whose checksum has been verified,
    validated against everything the format allows: a JSON object with exactly its keys; unique
    non-empty names; a known kind; a fixed field's dtype among ``DTYPES`` (little-endian or
    byte-order free numbers) and a shape of at most ``MAX_DIMS`` non-negative ints whose size is
    its ``nbytes``; a bytes field's offsets block of ``num_examples + 1`` uint64; every block
    64-byte aligned, after the header, inside the file and overlapping no other; CRCs in 32 bits.
    Raises LoaderFileError naming the file and the first thing wrong."""
    def bad(msg: str) -> LoaderFileError:
        return LoaderFileError(f"{path}: invalid header: {msg}")

    def integer(v, what: str, hi: int) -> int:
        if type(v) is not int or not 0 <= v <= hi:    # bool is not an int here
            raise bad(f"{what} is {v!r}, not an integer in [0, {hi}]")
        return v

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LoaderFileError(f"{path}: corrupt header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict) or not {"num_examples", "fields"} <= set(header) <= {"num_examples", "fields",
                                                                                             "attrs"}:
        raise bad("not an object with num_examples, fields and attrs")
    n = integer(header["num_examples"], "num_examples", 1 << 40)
    attrs = header.get("attrs", {})
    if not isinstance(attrs, dict):
        raise bad(f"attrs is a {type(attrs).__name__}, not an object")
    descs = header["fields"]
    if not isinstance(descs, list) or not descs:
        raise bad("fields is not a non-empty list")
    data_start = _PREFIX.size + len(raw)
    fields: dict[str, FieldInfo] = {}
    blocks = []

    def block(name: str, what: str, offset, nbytes):
        offset = integer(offset, f"field {name!r}: {what}offset", size)
        nbytes = integer(nbytes, f"field {name!r}: {what}nbytes", size)
        if offset % ALIGN or offset < data_start:
            raise bad(f"field {name!r}: {what}offset {offset} is not a multiple of {ALIGN} after the header")
        if offset + nbytes > size:
            raise LoaderFileError(f"{path}: truncated: field {name!r} ends at byte {offset + nbytes} but the file "
                                  f"has {size}")
        if nbytes:
            blocks.append((offset, offset + nbytes, name))
        return offset, nbytes

    for d in descs:
        if not isinstance(d, dict):
            raise bad("a field is not an object")
        name = d.get("name")
        if not isinstance(name, str) or not name or "#" in name:
            raise bad(f"field name {name!r} is not a non-empty string without '#'")
        if name in fields:
            raise bad(f"field {name!r} appears twice")
        kind = d.get("kind")
        if kind not in ("fixed", "bytes"):
            raise LoaderFileError(f"{path}: field {name!r} has unknown kind {kind!r}")
        keys = _FIXED_KEYS if kind == "fixed" else _BYTES_KEYS
        if set(d) != keys:
            raise bad(f"field {name!r} has keys {sorted(d)}, a {kind} field has {sorted(keys)}")
        crc = integer(d["crc32"], f"field {name!r}: crc32", 0xFFFFFFFF)
        offset, nbytes = block(name, "", d["offset"], d["nbytes"])
        if kind == "fixed":
            if not isinstance(d["dtype"], str) or d["dtype"] not in DTYPES:
                raise bad(f"field {name!r} has dtype {d['dtype']!r}; allowed: {sorted(DTYPES)}")
            shape = d["shape"]
            if not isinstance(shape, list) or len(shape) > MAX_DIMS:
                raise bad(f"field {name!r}: shape {shape!r} is not a list of at most {MAX_DIMS} sizes")
            shape = tuple(integer(v, f"field {name!r}: a shape entry", 1 << 40) for v in shape)
            dtype = np.dtype(d["dtype"])
            expect = n * math.prod(shape) * dtype.itemsize
            if expect != nbytes:
                raise LoaderFileError(f"{path}: field {name!r} declares {nbytes} bytes, its shape and dtype need "
                                      f"{expect}")
            fields[name] = FieldInfo(name, kind, dtype, shape, offset, nbytes, crc)
        else:
            index_offset, index_nbytes = block(name, "index_", d["index_offset"], d["index_nbytes"])
            if index_nbytes != 8 * (n + 1):
                raise LoaderFileError(f"{path}: bytes field {name!r} has a malformed offsets block")
            fields[name] = FieldInfo(name, kind, np.dtype(np.uint8), (), offset, nbytes, crc, index_offset,
                                     index_nbytes, integer(d["index_crc32"], f"field {name!r}: index_crc32",
                                                           0xFFFFFFFF))
    blocks.sort()
    for (s0, e0, a), (s1, _, b) in zip(blocks, blocks[1:]):
        if s1 < e0:
            raise bad(f"the blocks of fields {a!r} and {b!r} overlap")
    return n, fields, attrs


class LoaderFile:
    """Reader: validates the header, then exposes fields as read-only memory maps."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise LoaderFileError(f"{self.path}: no such loader file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(_PREFIX.size)
                if len(prefix) >= 8 and prefix[:8] != MAGIC:
                    raise LoaderFileError(f"{self.path}: not a provenance loader file (magic {prefix[:8]!r})")
                if len(prefix) >= 10 and struct.unpack("<H", prefix[8:10])[0] not in READABLE:
                    version = struct.unpack("<H", prefix[8:10])[0]
                    raise LoaderFileError(f"{self.path}: format version {version}, this reader knows {READABLE}"
                                          + (" (older files have no header checksum: write the file again, e.g. "
                                             "re-materialize loader_files)" if version < VERSION else ""))
                if len(prefix) < _PREFIX.size:
                    raise LoaderFileError(f"{self.path}: truncated ({size} bytes, shorter than the prefix)")
                magic, version, header_len, header_crc = _PREFIX.unpack(prefix)
                if header_len > min(MAX_HEADER, size - _PREFIX.size):
                    raise LoaderFileError(f"{self.path}: truncated inside the header (it declares {header_len} "
                                          f"bytes, the file has {size - _PREFIX.size} after the prefix)")
                raw = f.read(header_len)
        except OSError as e:
            raise LoaderFileError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        if len(raw) < header_len:
            raise LoaderFileError(f"{self.path}: truncated inside the header")
        if _crc(raw) != header_crc:
            raise LoaderFileError(f"{self.path}: checksum mismatch in the header: the file is corrupt")
        self.version = version
        self.num_examples, self.fields, self.attrs = parse_header(raw, size, self.path)
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
            seed = _seed(self.num_examples, {"name": name, "kind": info.kind, **(
                {"dtype": info.dtype.str, "shape": info.shape} if info.kind == "fixed" else {})})
            if info.kind == "bytes":
                offs = self._offsets(name)
                if _crc(offs, seed) != info.index_crc32:
                    raise LoaderFileError(f"{self.path}: checksum mismatch in the offsets of {name!r}: "
                                          f"the file is corrupt")
                if len(offs) and (offs[0] != 0 or offs[-1] != info.nbytes or np.any(np.diff(offs.astype(np.int64)) < 0)):
                    raise LoaderFileError(f"{self.path}: the offsets of {name!r} are inconsistent")
                blocks = [self._data(name)] if info.nbytes else []
            else:
                blocks = [self.array(name)] if info.nbytes else []
            if not blocks and seed != info.crc32:
                raise LoaderFileError(f"{self.path}: checksum mismatch in field {name!r}: the file is corrupt")
            for block in blocks:
                if _crc(block, seed) != info.crc32:
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
