"""Stages from the dataset to the files the training loop reads, and the subset masks."""
from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from kernels.loader import LoaderFile, write_loader_file
from ops.attacks import build_training_set
from ops.sources import load_source
from ops.spec import Spec
from ops.store import ArtifactError, ArtifactStore

RAW, TRAIN, LOADER, MASKS = "raw_dataset", "training_set", "loader_files", "subset_masks"


def raw_dataset(spec: Spec, store: ArtifactStore, exp: str) -> dict:
    raw = load_source(spec.dataset, spec.seed)
    store.save_npy(exp, RAW, "images.npy", raw.images)
    store.save_npy(exp, RAW, "labels.npy", raw.labels)
    store.save_npy(exp, RAW, "is_test.npy", raw.is_test)
    store.save_npy(exp, RAW, "poisoned.npy", raw.poisoned if raw.poisoned is not None
                   else np.full(len(raw.labels), -1, np.int8))
    store.save_json(exp, RAW, "meta.json", {"classes": raw.classes, "ids": raw.ids.tolist(),
                                            "source": spec.dataset.source, **raw.meta})
    return {"examples": len(raw.labels), "train": int((~raw.is_test).sum()), "test": int(raw.is_test.sum()),
            "image_shape": list(raw.images.shape[1:]), "classes": len(raw.classes)}


def _load_raw(store: ArtifactStore, exp: str):
    from ops.sources import RawData

    meta = store.load_json(exp, RAW, "meta.json")
    poisoned = np.asarray(store.load_npy(exp, RAW, "poisoned.npy"))
    return RawData(np.asarray(store.load_npy(exp, RAW, "labels.npy")), np.asarray(meta["ids"]),
                   np.asarray(store.load_npy(exp, RAW, "is_test.npy")), meta["classes"],
                   np.asarray(store.load_npy(exp, RAW, "images.npy")),
                   None if (poisoned < 0).all() else poisoned, meta)


def training_set(spec: Spec, store: ArtifactStore, exp: str) -> dict:
    ts = build_training_set(_load_raw(store, exp), spec.attack, spec.seed)
    for name in ("train_images", "train_labels", "original_labels", "poisoned", "test_images", "test_labels",
                 "triggered_images", "triggered_labels", "triggered_targets"):
        store.save_npy(exp, TRAIN, f"{name}.npy", getattr(ts, name))
    store.save_json(exp, TRAIN, "meta.json", {
        "classes": ts.classes, "target_class": ts.target_class, "attack": spec.attack.kind,
        "mapping": spec.attack.mapping, "train_ids": ts.train_ids.tolist(),
        "test_ids": ts.test_ids.tolist(), "triggered_ids": ts.triggered_ids.tolist()})
    known = ts.poisoned >= 0
    truth = pl.DataFrame({
        "experiment": exp, "example_id": ts.train_ids, "train_index": np.arange(len(ts.train_ids)),
        "label": ts.train_labels, "original_label": ts.original_labels,
        "poisoned": pl.Series(np.where(known, ts.poisoned == 1, None).tolist(), dtype=pl.Boolean)})
    store.save_table(exp, TRAIN, "poison_truth.parquet", truth)
    cols = ["experiment", "example_id", "split", "split_index", "label", "original_label", "poisoned"]
    examples = pl.concat([
        truth.drop("train_index").with_columns(split=pl.lit("train"),
                                               split_index=pl.Series(np.arange(len(ts.train_ids)))).select(cols),
        pl.DataFrame({"experiment": exp, "example_id": ts.test_ids, "split": "test",
                      "split_index": np.arange(len(ts.test_ids)), "label": ts.test_labels,
                      "original_label": ts.test_labels,
                      "poisoned": pl.Series([False] * len(ts.test_ids), dtype=pl.Boolean)}),
        pl.DataFrame({"experiment": exp, "example_id": ts.triggered_ids, "split": "test_triggered",
                      "split_index": np.arange(len(ts.triggered_ids)), "label": ts.triggered_labels,
                      "original_label": ts.triggered_labels,
                      "poisoned": pl.Series([True] * len(ts.triggered_ids), dtype=pl.Boolean)}),
    ], how="vertical_relaxed")
    store.save_table(exp, TRAIN, "examples.parquet", examples)
    n_known = int(known.sum())
    return {"train": len(ts.train_labels), "poisoned": int((ts.poisoned == 1).sum()),
            "truth_known": n_known == len(known), "test": len(ts.test_labels),
            "triggered_test": len(ts.triggered_labels), "attack": spec.attack.kind}


SPLITS = {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels"),
          "triggered": ("triggered_images", "triggered_labels")}


def loader_files(spec: Spec, store: ArtifactStore, exp: str) -> dict:
    out = {}
    meta = store.load_json(exp, TRAIN, "meta.json")
    digest = hashlib.sha256()
    for split, (img, lab) in SPLITS.items():
        images = np.asarray(store.load_npy(exp, TRAIN, f"{img}.npy"))
        labels = np.asarray(store.load_npy(exp, TRAIN, f"{lab}.npy"))
        fields = {"image": images, "label": labels.astype(np.int64), "id": [str(i) for i in meta[f"{split}_ids"]]}
        hashed = [images, labels]
        if split == "triggered" and store.path(exp, TRAIN, "triggered_targets.npy").exists():
            fields["target"] = np.asarray(store.load_npy(exp, TRAIN, "triggered_targets.npy")).astype(np.int64)
            hashed.append(fields["target"])
        for a in hashed:
            digest.update(f"{split}:{a.dtype.str}:{a.shape}".encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        path = store.path(exp, LOADER, f"{split}.pvl")
        write_loader_file(path, fields, attrs={"experiment": exp, "split": split})
        out[split] = {"path": str(path), "examples": len(labels), "bytes": path.stat().st_size}
    out["data_digest"] = digest.hexdigest()[:16]
    store.save_json(exp, LOADER, "digest.json", {"data_digest": out["data_digest"]})
    return out


def data_digest(store: ArtifactStore, exp: str) -> str:
    """A digest of the images and labels of every split in the loader files: part of every
    model's key, since a model (and the margins stored with it) is only valid for its data."""
    if not store.path(exp, LOADER, "digest.json").exists():
        raise ArtifactError(f"{store.path(exp, LOADER, 'digest.json')} is missing (loader files from an older "
                            f"version): re-materialize loader_files")
    return store.load_json(exp, LOADER, "digest.json")["data_digest"]


def open_loader(store: ArtifactStore, exp: str, split: str) -> LoaderFile:
    f = LoaderFile(store.require(exp, LOADER, f"{split}.pvl"))
    if len(f):
        shape = f.fields["image"].shape if "image" in f.fields else ()
        f.check_schema({"image": ("uint8", shape), "label": ("int64", ())})
        if len(shape) != 3:
            raise ValueError(f"{f.path}: images must be H x W x C, got shape {list(shape)}")
    return f


def subset_masks(spec: Spec, store: ArtifactStore, exp: str) -> dict:
    """m train + h held-out masks, each exactly round(alpha * n) examples, seeded."""
    n = int(len(store.load_npy(exp, TRAIN, "train_labels.npy")))
    m, h = spec.subsets.num_models, spec.subsets.num_heldout
    k = round(spec.subsets.alpha * n)
    rng = np.random.default_rng([spec.seed, 17])
    masks = np.zeros((m + h, n), bool)
    for i in range(m + h):
        masks[i, rng.choice(n, size=k, replace=False)] = True
    store.save_npy(exp, MASKS, "masks.npy", masks)
    table = pl.DataFrame({"experiment": exp, "mask_index": np.arange(m + h),
                          "role": ["train"] * m + ["heldout"] * h, "size": k})
    store.save_table(exp, MASKS, "masks.parquet", table)
    return {"train_masks": m, "heldout_masks": h, "subset_size": k, "n": n}
