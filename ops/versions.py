"""What each stage's result depends on, as digests: the spec's sections and the dataset's files.

Dagster decides what is stale from data versions: an asset is stale when a dependency's data
version differs from the one recorded when the asset was last materialized.  The lineage's
sources are the dataset behind an experiment (``dataset_source``: a digest of its files' content) and
one source per spec section (``spec/<section>``: a digest of that section), each read by the
first stage that uses it (``READERS``).  So an edit of ``detector.restarts`` changes
``spec/detector`` and makes only ``backdoor_report`` stale; new rows in a Parquet table change
``dataset_source`` and make ``raw_dataset`` stale, and everything after it once it is re-materialized
with new content.  Which models are trained again is still the store's business: only those
whose (recipe, data, mask, seed) key is new.

Nothing here knows Dagster (assets/sources.py turns these digests into observations).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ops.spec import Spec

# spec section -> the Spec fields it covers; every field but ``name`` is in exactly one
SECTIONS: dict[str, tuple[str, ...]] = {
    "dataset": ("seed", "dataset"),      # the seed draws the split and everything after it
    "attack": ("attack",),
    "subsets": ("subsets",),
    "training": ("model", "training"),
    "trak": ("trak",),
    "datamodels": ("datamodels",),
    "lds": ("lds",),
    "detector": ("detector",),
    "other": ("description", "inbox"),
    "robustness": ("robustness",),      # a study's section: read by its first asset
    "regimes": ("regimes",),
    "smallify": ("smallify",),
    "threedb": ("threedb",),
    "photoguard": ("photoguard",),
}

SOURCE = "dataset_source"

# source -> the first asset that reads it (the others that read it are downstream of that one)
READERS: dict[str, str] = {
    SOURCE: "raw_dataset",
    "spec/dataset": "raw_dataset",
    "spec/attack": "training_set",
    "spec/subsets": "subset_masks",
    "spec/training": "checkpoints",
    "spec/trak": "gradient_features",
    "spec/datamodels": "datamodel_weights",
    "spec/lds": "lds_evaluation",
    "spec/detector": "backdoor_report",
    "spec/other": "warehouse",
    "spec/robustness": "robust_models",
    "spec/regimes": "regimes_runs",
    "spec/smallify": "smallify_runs",
    "spec/threedb": "threedb_model",
    "spec/photoguard": "photoguard_models",
}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def section_digests(spec: Spec) -> dict[str, str]:
    """``{"spec/<section>": digest}`` for every section of ``SECTIONS``."""
    body = spec.model_dump(mode="json")
    if spec.threedb is not None and isinstance(spec.threedb.config, str):
        # a 3DB config named by path: its content (with its base configs) is part of the section
        from ops.threedb import ThreeDBConfigError, load_config_dict

        try:
            body["threedb"] = {**body["threedb"], "config_content": load_config_dict(spec.threedb.config)}
        except (OSError, ThreeDBConfigError):
            pass
    if spec.photoguard is not None:
        # the user's images and checkpoint named by path: their files' names, sizes and times are part
        # of the section (stat only: a checkpoint's weights are gigabytes)
        body["photoguard"] = {**body["photoguard"], "files": _stat_listing(spec.photoguard.images) +
                              _stat_listing(spec.photoguard.checkpoint) + _stat_listing(spec.photoguard.context)}
    return {f"spec/{s}": _digest({f: body[f] for f in fields}) for s, fields in SECTIONS.items()}


def _stat_listing(path: str | None) -> list:
    """(relative name, size, mtime) of a file or of every file under a folder; [] for None or a
    path that is gone (the spec's validation refuses that anyway)."""
    if path is None:
        return []
    root = Path(path)
    try:
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        return [[f.relative_to(root).as_posix() if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                for f in files]
    except OSError:
        return []


# ------------------------------------------------------------------ the dataset's files


def source_files(ds) -> tuple[str, list[tuple[str, Path]]]:
    """A label for the source and its files as (name within its root, path); the embedded digits
    have none.

    A path that does not exist contributes nothing: the spec's validation refuses it anyway."""
    from ops.sources import FASHION_DEFAULT, IMAGE_SUFFIXES

    if ds.source == "digits":
        import sklearn

        return f"digits (scikit-learn {sklearn.__version__})", []
    if ds.source == "fashion_mnist":
        roots = [Path(ds.path or FASHION_DEFAULT)]
        keep = lambda f: "idx" in f.name           # noqa: E731  the four IDX files, gzipped or not
    elif ds.source == "cifar10":
        roots = [Path(ds.path or Path.home() / ".cache" / "provenance") / "cifar-10-batches-py"]
        keep = lambda f: True                       # noqa: E731
    elif ds.source == "image_folder":
        roots = [Path(p) for p in (ds.path, ds.test_path) if p]
        keep = lambda f: f.suffix.lower() in IMAGE_SUFFIXES   # noqa: E731
    else:   # parquet
        roots = [Path(p) for p in (ds.path, ds.test_path) if p]
        keep = lambda f: True                       # noqa: E731
    files = []
    for i, root in enumerate(roots):
        if root.is_file():
            files.append((f"{i}/{root.name}", root))
        elif root.is_dir():
            files += sorted((f"{i}/{f.relative_to(root).as_posix()}", f) for f in root.rglob("*")
                            if f.is_file() and not f.name.startswith(".") and keep(f))
    return ds.source, files


class FileDigests:
    """sha256 of files, remembered by (path, size, modification time, inode) in a JSON file so a
    sensor tick re-reads only files that changed (how make and git's index decide too)."""

    def __init__(self, cache: str | os.PathLike | None):
        self.path = Path(cache) if cache else None
        self.known: dict[str, str] = {}
        if self.path and self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.known = {}      # a damaged cache is only a cache
        self.dirty = False

    def __call__(self, f: Path) -> str:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in self.known:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            self.known[key] = h.hexdigest()
            self.dirty = True
        return self.known[key]

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.known, fh)
        os.replace(tmp, self.path)
        self.dirty = False


def source_digest(ds, cache: str | os.PathLike | None = None) -> str:
    """A digest of the dataset's content: every file's name relative to its root and its bytes
    (a renamed class folder or an added image changes it; touching a file does not)."""
    label, files = source_files(ds)
    digests = FileDigests(cache)
    body = {"source": label,
            "files": [[name, digests(f)] for name, f in files]}
    digests.save()
    return _digest(body)


def versions(spec: Spec, cache: str | os.PathLike | None = None) -> dict[str, str]:
    """Every source of the experiment's lineage with its digest: ``dataset_source`` and ``spec/<section>``."""
    return {SOURCE: source_digest(spec.dataset, cache), **section_digests(spec)}
