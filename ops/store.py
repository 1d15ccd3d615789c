"""The artifact store: files under ``<root>/<experiment>/<asset>/<name>``, written atomically.

Every write goes to a temporary file in the destination folder and is renamed into place, so
a crash leaves either the old artifact or the new one, never half of one.  Formats others can
read: ``.npy`` for arrays (memory-mapped on load), Parquet for tables, safetensors for model
weights, JSON for small documents.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np


class ArtifactError(RuntimeError):
    """A required artifact is missing or does not match what the reader expects."""


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, experiment: str, asset: str, name: str = "") -> Path:
        p = self.root / experiment / asset
        return p / name if name else p

    @contextmanager
    def atomic(self, experiment: str, asset: str, name: str) -> Iterator[Path]:
        """Yields a temporary path; on success it is renamed to the artifact's path."""
        dest = self.path(experiment, asset, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def require(self, experiment: str, asset: str, name: str) -> Path:
        p = self.path(experiment, asset, name)
        if not p.exists():
            raise ArtifactError(f"{p} is missing: materialize {asset!r} for experiment {experiment!r} first")
        return p

    # arrays
    def save_npy(self, experiment: str, asset: str, name: str, array: np.ndarray) -> Path:
        with self.atomic(experiment, asset, name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(array), allow_pickle=False)
        return self.path(experiment, asset, name)

    @contextmanager
    def open_npy(self, experiment: str, asset: str, name: str, shape: tuple, dtype) -> Iterator[np.ndarray]:
        """A writable .npy memory map filled in place; renamed into place only if the block succeeds.

        For arrays larger than memory (features of many checkpoints): rows are written as they
        are computed and never held all at once.
        """
        with self.atomic(experiment, asset, name) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            try:
                yield arr
                arr.flush()
            finally:
                del arr

    def load_npy(self, experiment: str, asset: str, name: str, mmap: bool = True) -> np.ndarray:
        return np.load(self.require(experiment, asset, name), mmap_mode="r" if mmap else None,
                       allow_pickle=False)

    # tables
    def save_table(self, experiment: str, asset: str, name: str, table) -> Path:
        """Write a polars DataFrame (or a pyarrow Table) to Parquet with pyarrow, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = table.to_arrow()
        with self.atomic(experiment, asset, name) as tmp:
            pq.write_table(table, tmp)
        return self.path(experiment, asset, name)

    def load_table(self, experiment: str, asset: str, name: str):
        """A stored table as a polars DataFrame (read through Arrow)."""
        import polars as pl
        import pyarrow.parquet as pq

        return pl.from_arrow(pq.read_table(self.require(experiment, asset, name)))

    # json
    def save_json(self, experiment: str, asset: str, name: str, obj) -> Path:
        with self.atomic(experiment, asset, name) as tmp:
            Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable))
        return self.path(experiment, asset, name)

    def load_json(self, experiment: str, asset: str, name: str):
        return json.loads(self.require(experiment, asset, name).read_text())

    # tensors
    def save_tensors(self, experiment: str, asset: str, name: str, tensors: Mapping,
                     metadata: Mapping[str, str]) -> Path:
        from safetensors.torch import save_file

        with self.atomic(experiment, asset, name) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={k: str(v) for k, v in metadata.items()})
        return self.path(experiment, asset, name)

    def stack_tensors(self, experiment: str, asset: str, name: str, sources: list[str], metadata: Mapping[str, str],
                      keys=None, expect=None, on_source=None) -> Path:
        """Write ``name`` with the tensors of the ``sources`` (files of the same asset) stacked along a
        new first axis, streaming one tensor at a time (kernels/stacked.py); a source of another
        layout is refused with an ArtifactError naming it."""
        from kernels.stacked import StackError, write_stacked

        paths = [self.require(experiment, asset, s) for s in sources]
        with self.atomic(experiment, asset, name) as tmp:
            try:
                write_stacked(paths, tmp, metadata, keys=keys, expect=expect, on_source=on_source)
            except StackError as e:
                raise ArtifactError(str(e)) from None
        return self.path(experiment, asset, name)

    def tensor_metadata(self, experiment: str, asset: str, name: str) -> dict:
        """A safetensors file's metadata, read from its header without loading tensors."""
        from safetensors import safe_open

        with safe_open(str(self.require(experiment, asset, name)), framework="pt") as f:
            return dict(f.metadata() or {})

    def load_tensors(self, experiment: str, asset: str, name: str) -> tuple[dict, dict]:
        from safetensors import safe_open

        p = self.require(experiment, asset, name)
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
