""".npy files read and written by row blocks with positioned I/O, never memory-mapped.

The attribution stage's arrays (features of every checkpoint, test x train and train x train
scores) outgrow memory at the papers' scale: 50,000 x 50,000 float32 scores are 10 GB.  Pages of
a memory map that a process touches count toward its resident set until the kernel evicts them,
so writing such a file through ``np.memmap`` makes the peak RSS follow the file's size.
``os.pread``/``os.pwrite`` on row blocks keep it at one block.  The files are plain .npy (version
1.0/2.0 headers, C order), so readers elsewhere may still ``np.load(..., mmap_mode="r")`` them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class Closing:
    """``close()`` on leaving a with-block and on garbage collection (for classes holding an OS
    resource: a file descriptor here, a render server in kernels/render.py)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass


class NpyFile(Closing):
    """A C-ordered .npy file addressed by rows of its first axis (or of its first two axes,
    flattened: ``rows(i, j0, j1)`` reads rows j0:j1 of sub-array i of a 3-d array)."""

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR if mode == "r+" else os.O_RDONLY)
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read:
                    raise ValueError(f"format version {version} is not read by blocks")
                shape, fortran, dtype = read[version](f)
            except ValueError as e:
                os.close(self._fd)
                raise ValueError(f"{self.path}: not a .npy file ({e})") from None
            self.offset = f.tell()
        if fortran or dtype.hasobject:
            os.close(self._fd)
            raise ValueError(f"{self.path}: only C-ordered numeric .npy files are read by blocks")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        size = self.offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        actual = os.fstat(self._fd).st_size
        if actual < size:
            os.close(self._fd)
            raise ValueError(f"{self.path}: truncated ({actual} bytes, the header promises {size})")

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple, dtype) -> "NpyFile":
        """A new file of ``shape`` (zero-filled, sparse on disk until written)."""
        dtype = np.dtype(dtype)
        with open(path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": tuple(shape)})
            f.truncate(f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return cls(path, "r+")

    def _pos(self, row: int) -> int:
        return self.offset + row * self.row_items * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the first axis, as a new array."""
        stop = min(stop, self.shape[0])
        out = np.empty((max(0, stop - start),) + self.shape[1:], self.dtype)
        self._read_into(out, self._pos(start))
        return out

    def rows(self, i: int, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of sub-array i of a 3-d (or 2-d) array."""
        if len(self.shape) < 2:
            raise ValueError(f"{self.path}: rows() needs at least two axes, the file has {self.shape}")
        n = self.shape[1]
        stop = min(stop, n)
        inner = self.shape[2:]
        out = np.empty((max(0, stop - start),) + inner, self.dtype)
        per = int(np.prod(inner, dtype=np.int64)) * self.dtype.itemsize
        self._read_into(out, self.offset + (i * n + start) * per)
        return out

    def _read_into(self, out: np.ndarray, pos: int) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], pos + done)
            if got <= 0:
                raise ValueError(f"{self.path}: truncated at byte {pos + done}")
            done += got

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows start:start+len(block) of the first axis."""
        self._write(self._pos(start), block)

    def write_rows(self, i: int, start: int, block: np.ndarray) -> None:
        """Rows start:start+len(block) of sub-array i of a 3-d (or 2-d) array."""
        per = int(np.prod(self.shape[2:], dtype=np.int64)) * self.dtype.itemsize
        self._write(self.offset + (i * self.shape[1] + start) * per, block)

    def _write(self, pos: int, block: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(block, self.dtype).reshape(-1).view(np.uint8))
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], pos + done)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

