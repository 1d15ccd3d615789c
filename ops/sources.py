"""Dataset sources -> RawData (uint8 images [N, H, W, C], labels, stable ids, split).

Sources: ``digits`` (inside scikit-learn, no network), ``fashion_mnist`` (IDX files, e.g. from
Debian's dataset-fashion-mnist, or a torchvision download), ``cifar10`` (torchvision), an
``image_folder`` (one subfolder per class) and a ``parquet`` table of encoded image bytes and
labels (optionally ``id`` and ``poisoned`` columns).  Every source goes through the same split
and limit logic, which ``train_label_counts`` runs on labels alone for spec validation.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FASHION_DEFAULT = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class SourceError(ValueError):
    """The dataset a spec names cannot be read."""


@dataclass
class RawData:
    labels: np.ndarray            # int64 [N]
    ids: np.ndarray               # str [N], stable across runs
    is_test: np.ndarray           # bool [N]
    classes: list[str]
    images: np.ndarray | None = None          # uint8 [N, H, W, C]
    poisoned: np.ndarray | None = None        # int8 [N]: 1, 0, or -1 unknown (from the source)
    meta: dict = field(default_factory=dict)

    def select(self, idx: np.ndarray) -> "RawData":
        return RawData(self.labels[idx], self.ids[idx], self.is_test[idx], self.classes,
                       None if self.images is None else self.images[idx],
                       None if self.poisoned is None else self.poisoned[idx], self.meta)


# ------------------------------------------------------------------ sources


def _digits(ds, labels_only):
    from sklearn.datasets import load_digits

    d = load_digits()
    n = len(d.target)
    images = None
    if not labels_only:
        images = np.clip(np.rint(d.images * 16), 0, 255).astype(np.uint8)[..., None]
    return RawData(d.target.astype(np.int64), np.array([f"digits-{i:04d}" for i in range(n)]),
                   np.zeros(n, bool), [str(c) for c in range(10)], images)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise SourceError(f"dataset.path: cannot read {path}: {e}") from None
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 8:
        raise SourceError(f"dataset.path: {path} is not an unsigned-byte IDX file")
    ndim = buf[3]
    dims = struct.unpack(f">{ndim}I", buf[4:4 + 4 * ndim])
    data = np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"dataset.path: {path} is truncated ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        for cand in (folder / name, folder / "FashionMNIST" / "raw" / name):
            if cand.is_file():
                return cand
    raise SourceError(f"dataset.path: no {stem}[.gz] under {folder} (install Debian's "
                      f"dataset-fashion-mnist, or set dataset.download: true)")


def _fashion(ds, labels_only):
    folder = Path(ds.path or FASHION_DEFAULT)
    if ds.download and not (folder / "train-labels-idx1-ubyte.gz").exists():
        from torchvision.datasets import FashionMNIST

        folder = Path(ds.path or Path.home() / ".cache" / "provenance")
        for train in (True, False):
            FashionMNIST(str(folder), train=train, download=True)
    if not folder.is_dir():
        raise SourceError(f"dataset.path: {folder} does not exist (install Debian's dataset-fashion-mnist, "
                          f"or set dataset.download: true)")
    parts = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = _read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        images = None if labels_only else _read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))[..., None]
        if images is not None and len(images) != len(labels):
            raise SourceError(f"dataset.path: {split} has {len(images)} images but {len(labels)} labels")
        parts.append((split, labels, images))
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"]
    return _concat(parts, "fmnist", classes)


def _cifar10(ds, labels_only):
    from torchvision.datasets import CIFAR10

    root = ds.path or str(Path.home() / ".cache" / "provenance")
    parts = []
    for split in ("train", "test"):
        try:
            d = CIFAR10(root, train=split == "train", download=ds.download)
        except RuntimeError as e:
            raise SourceError(f"dataset.path: {e} (set dataset.download: true to fetch CIFAR-10)") from None
        parts.append((split, np.asarray(d.targets, np.int64), None if labels_only else np.asarray(d.data)))
    return _concat(parts, "cifar10", list(d.classes))


def _concat(parts, prefix, classes):
    labels = np.concatenate([p[1] for p in parts])
    ids = np.concatenate([[f"{prefix}-{split}-{i:05d}" for i in range(len(lab))] for split, lab, _ in parts])
    is_test = np.concatenate([np.full(len(p[1]), p[0] == "test") for p in parts])
    images = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return RawData(labels, ids, is_test, classes, images, meta={"has_test_split": True})


def _decode(data: bytes, where: str, ds) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        img = img.convert("L" if ds.channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise SourceError(f"dataset: cannot decode the image {where}: {e}") from None
    if ds.image_size:
        img = img.resize((ds.image_size, ds.image_size))
    a = np.asarray(img, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _decode_all(blobs: list, names: list[str], ds) -> np.ndarray:
    """Decode images on a thread pool (PIL releases the GIL while decoding), then stack them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda a: _decode(a[0], a[1], ds), zip(blobs, names)))
    return _stack(images, names)


def probe_images(blobs: list, names: list[str], ds) -> None:
    """Open every image's header (no full decode): one that cannot be identified, or sizes that
    differ without ``image_size``, is refused naming the file or row (``./provenance validate``
    and ``run`` check this before anything is written)."""
    from PIL import Image, UnidentifiedImageError

    first = None
    for data, name in zip(blobs, names):
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as img:
                size = img.size
        except (UnidentifiedImageError, OSError) as e:
            raise SourceError(f"dataset: cannot decode the image {name}: {e}") from None
        if ds.image_size is None:
            if first is None:
                first = (size, name)
            elif size != first[0]:
                raise SourceError(f"dataset.image_size: {name} is {size[0]}x{size[1]} but {first[1]} is "
                                  f"{first[0][0]}x{first[0][1]}; set image_size to resize them")


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    shape = images[0].shape
    for img, name in zip(images, names):
        if img.shape != shape:
            raise SourceError(f"dataset.image_size: {name} is {img.shape[1]}x{img.shape[0]} but "
                              f"{names[0]} is {shape[1]}x{shape[0]}; set image_size to resize them")
    return np.stack(images)


def _folder_listing(root: Path, key: str):
    if not root.is_dir():
        raise SourceError(f"dataset.{key}: {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"dataset.{key}: {root} has no class subfolders")
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(c)
    if not files:
        raise SourceError(f"dataset.{key}: no images under {root}")
    return classes, files, np.asarray(labels, np.int64)


def _image_folder(ds, labels_only):
    root = Path(ds.path)
    classes, files, labels = _folder_listing(root, "path")
    parts = [(files, labels, np.zeros(len(files), bool), root)]
    if ds.test_path:
        tclasses, tfiles, tlabels = _folder_listing(Path(ds.test_path), "test_path")
        unknown = set(tclasses) - set(classes)
        if unknown:
            raise SourceError(f"dataset.test_path: classes {sorted(unknown)} are not in dataset.path")
        remap = np.array([classes.index(c) for c in tclasses])
        parts.append((tfiles, remap[tlabels], np.ones(len(tfiles), bool), Path(ds.test_path)))
    all_files = [f for p in parts for f in p[0]]
    ids = np.array([f"{'test' if t else 'train'}/{f.relative_to(base).as_posix()}"
                    for files_, _, flags, base in parts for f, t in zip(files_, flags)])
    images = None
    if labels_only == "probe":
        probe_images(all_files, [str(f) for f in all_files], ds)
    elif not labels_only:
        images = _decode_all([f.read_bytes() for f in all_files], [str(f) for f in all_files], ds)
    return RawData(np.concatenate([p[1] for p in parts]), ids, np.concatenate([p[2] for p in parts]),
                   classes, images, meta={"has_test_split": bool(ds.test_path)})


def _read_table(path: str, ds, key: str, labels_only: bool):
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise SourceError(f"dataset.{key}: {p} does not exist")
    try:
        schema = pq.read_schema(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise SourceError(f"dataset.{key}: {p} is not a readable Parquet file: {e}") from None
    for col in (ds.label_column,) + (() if labels_only is True else (ds.image_column,)):
        if col not in schema.names:
            raise SourceError(f"dataset.{key}: {p} has no column {col!r} (columns: {schema.names})")
    cols = [ds.label_column] + [c for c in ("id", "poisoned") if c in schema.names]
    if labels_only is not True:
        cols.append(ds.image_column)
    return pq.read_table(p, columns=cols).to_pydict()


def _parquet(ds, labels_only):
    tables = [(False, _read_table(ds.path, ds, "path", labels_only))]
    if ds.test_path:
        tables.append((True, _read_table(ds.test_path, ds, "test_path", labels_only)))
    raw_labels = [v for _, t in tables for v in t[ds.label_column]]
    if any(v is None for v in raw_labels):
        raise SourceError(f"dataset.label_column: {ds.label_column!r} has missing values")
    if all(isinstance(v, (int, np.integer)) for v in raw_labels):
        classes = [str(c) for c in range(max(raw_labels) + 1)]
        labels = np.asarray(raw_labels, np.int64)
    else:
        classes = sorted({str(v) for v in raw_labels})
        labels = np.asarray([classes.index(str(v)) for v in raw_labels], np.int64)
    ids, flags, poisoned, blobs, names = [], [], [], [], []
    for is_test, t in tables:
        n = len(t[ds.label_column])
        split = "test" if is_test else "train"
        own = [str(v) for v in t["id"]] if "id" in t else [f"{split}-{i:06d}" for i in range(n)]
        if "id" in t and any(v is None for v in t["id"]):
            raise SourceError(f"dataset.{'test_path' if is_test else 'path'}: the id column has a missing value "
                              f"(row {[v is None for v in t['id']].index(True)})")
        if len(set(own)) != len(own):    # ids are unique within a split; train and test may share values
            seen: set = set()
            dup = next(i for i, v in enumerate(own) if v in seen or seen.add(v))
            raise SourceError(f"dataset.{'test_path' if is_test else 'path'}: the id column has duplicate values "
                              f"(row {dup}: {own[dup]!r})")
        ids += own
        flags += [is_test] * n
        poisoned += [(-1 if v is None else int(bool(v))) for v in t["poisoned"]] if "poisoned" in t else [-1] * n
        if labels_only is not True:
            for i, v in enumerate(t[ds.image_column]):
                data = v["bytes"] if isinstance(v, dict) else v
                if data is None:
                    raise SourceError(f"dataset.image_column: row {i} of the {split} table has no image")
                blobs.append(data)
                names.append(f"in row {i} of the {split} table")
    if labels_only == "probe":
        probe_images(blobs, names, ds)
    return RawData(labels, np.asarray(ids), np.asarray(flags, bool), classes,
                   None if labels_only else _decode_all(blobs, names, ds), np.asarray(poisoned, np.int8),
                   meta={"has_test_split": bool(ds.test_path)})


SOURCES = {"digits": _digits, "fashion_mnist": _fashion, "cifar10": _cifar10,
           "image_folder": _image_folder, "parquet": _parquet}


# ------------------------------------------------------------------ split and limits


def _stratified_pick(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices, spread over classes in proportion to their sizes, sorted."""
    order = rng.permutation(len(labels))
    # round-robin over classes in a random order of each class's members
    by_class = [order[labels[order] == c] for c in np.unique(labels)]
    take = np.floor(np.array([len(b) for b in by_class]) * count / len(labels)).astype(int)
    rest = count - take.sum()
    for i in np.argsort([-(len(b) * count / len(labels) - t) for b, t in zip(by_class, take)])[:rest]:
        take[i] += 1
    return np.sort(np.concatenate([b[:t] for b, t in zip(by_class, take)]))


def split_and_limit(raw: RawData, ds, seed: int) -> RawData:
    rng = np.random.default_rng([seed, 7])
    is_test = raw.is_test.copy()
    if not raw.meta.get("has_test_split"):
        n_test = int(round(ds.test_fraction * len(raw.labels)))
        is_test[:] = False
        is_test[_stratified_pick(raw.labels, n_test, rng)] = True
    raw = RawData(raw.labels, raw.ids, is_test, raw.classes, raw.images, raw.poisoned, raw.meta)
    keep = np.ones(len(raw.labels), bool)
    for flag, limit in ((False, ds.limit_train), (True, ds.limit_test)):
        idx = np.flatnonzero(is_test == flag)
        if limit is not None and limit < len(idx):
            keep[idx] = False
            keep[idx[_stratified_pick(raw.labels[idx], limit, rng)]] = True
    return raw.select(np.flatnonzero(keep))


def load_source(ds, seed: int, labels_only: bool | str = False) -> RawData:
    """The source's examples, split and limited; ``labels_only``: True (no images) or "probe" (no
    images, but every image's header opened: probe_images)."""
    raw = SOURCES[ds.source](ds, labels_only)
    raw = split_and_limit(raw, ds, seed)
    if not (~raw.is_test).any() or not raw.is_test.any():
        raise SourceError("dataset: the split leaves no training or no test examples")
    return raw


def train_label_counts(ds, seed: int, probe: bool = False) -> dict[int, int]:
    """Training labels' counts; ``probe``: also open every image's header (image folders, Parquet)."""
    raw = load_source(ds, seed, labels_only="probe" if probe else True)
    labels, counts = np.unique(raw.labels[~raw.is_test], return_counts=True)
    return {int(c): int(n) for c, n in zip(labels, counts)}

