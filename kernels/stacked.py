"""Stack many safetensors files into one, one tensor at a time.

``models.safetensors`` holds every model of an experiment, each tensor stacked along a new first
axis ([M, *shape]).  Stacking them in memory (torch.stack, then safetensors' ``save_file``) holds
all M models, twice (the loaded list and the stacked copy): 2.7 GiB peak for 128 of the
repository's ResNet-9s (8.7 MiB each), ~9 GiB for 512 (bench/stack.py).  :func:`write_stacked` writes the same format
streaming: it lays out the header from the first file's shapes, sizes the file, and copies each
source's tensors to their slots with ``os.pwrite``, so memory is one tensor of one model.

The file is a plain safetensors file (8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the tensors' bytes back to back), readable by ``safe_open``;
:func:`write_stacked_reference` (torch.stack + ``save_file``) is what the tests compare it with.
Every source must hold exactly the first one's keys, dtypes and shapes; the first that does not is
named in the error.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Mapping

import torch

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8}


class StackError(ValueError):
    """A source file that cannot be stacked with the others (missing, unreadable or another layout)."""


def layout_of(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype, shape)} of a file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- safetensors raises several types; one message naming the file
        raise StackError(f"{path}: not a readable safetensors file ({e})") from None


def _check(path, got: Mapping, want: Mapping) -> None:
    if got == want:
        return
    for k in sorted(set(want) | set(got)):
        if k not in got:
            raise StackError(f"{path}: tensor {k!r} is missing (the other models have it)")
        if k not in want:
            raise StackError(f"{path}: unexpected tensor {k!r} (the other models do not have it)")
        if got[k] != want[k]:
            raise StackError(f"{path}: tensor {k!r} is {got[k][0]} {list(got[k][1])}, the other models' is "
                             f"{want[k][0]} {list(want[k][1])}")


def write_stacked(sources: list, out: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                  keys: Iterable[str] | None = None, expect: Mapping | None = None,
                  on_source: Callable[[int, object], None] | None = None) -> dict:
    """Write ``out`` with every tensor of ``keys`` (default: all of the first source's) stacked over
    ``sources`` in order.  ``expect`` ({key: (dtype, shape)}) is the layout every source must have
    (default: the first source's); ``on_source(i, f)`` is called with each open source (a
    ``safe_open`` handle) so that the caller can read other tensors of it in the same pass.
    Returns the stacked layout {key: (dtype, [M, *shape])}."""
    from safetensors import safe_open

    if not sources:
        raise StackError("no source files to stack")
    want = dict(expect) if expect is not None else layout_of(sources[0])
    names = sorted(want if keys is None else keys)
    unknown = [k for k in names if k not in want]
    if unknown:
        raise StackError(f"{sources[0]}: no tensor {unknown[0]!r}")
    m = len(sources)
    header, offsets, begin = {}, {}, 0
    for k in names:
        dtype, shape = want[k]
        if dtype not in ITEMSIZE:
            raise StackError(f"{sources[0]}: tensor {k!r} has dtype {dtype}, which is not stacked")
        per = math.prod(shape) * ITEMSIZE[dtype]
        header[k] = {"dtype": dtype, "shape": [m, *shape], "data_offsets": [begin, begin + per * m]}
        offsets[k] = (begin, per)
        begin += per * m
    if metadata:
        header["__metadata__"] = {str(a): str(b) for a, b in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    fd = os.open(str(out), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, len(text).to_bytes(8, "little") + text, 0)
        os.ftruncate(fd, start + begin)
        for i, src in enumerate(sources):
            _check(src, layout_of(src), want)
            with safe_open(str(src), framework="pt") as f:
                for k in names:
                    t = f.get_tensor(k).contiguous().reshape(-1)
                    raw = t.view(torch.uint8).numpy() if t.numel() else b""
                    b0, per = offsets[k]
                    if len(raw) != per:      # the header promised another size: refuse, never misplace
                        raise StackError(f"{src}: tensor {k!r} holds {len(raw)} bytes, its header says {per}")
                    if per:
                        os.pwrite(fd, memoryview(raw), start + b0 + i * per)
                if on_source is not None:
                    on_source(i, f)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {k: (h["dtype"], h["shape"]) for k, h in header.items() if k != "__metadata__"}


def write_stacked_reference(sources: list, out, metadata=None, keys=None) -> None:
    """The same file's contents through torch.stack and safetensors' own writer (all in memory)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    loaded = []
    for src in sources:
        with safe_open(str(src), framework="pt") as f:
            loaded.append({k: f.get_tensor(k) for k in (keys or f.keys())})
    save_file({k: torch.stack([d[k] for d in loaded]).contiguous() for k in loaded[0]}, str(out),
              metadata={str(a): str(b) for a, b in (metadata or {}).items()})

