"""New query examples scored against a finished experiment, without retraining anything.

``read_queries`` reads image files (one file = one example; a file in a subfolder named like one
of the experiment's classes carries that label) or Parquet tables in the experiment's format
(``dataset.image_column``, optional ``dataset.label_column`` and ``id``) and brings the images to
the experiment's shape and channels.  ``score_queries`` then computes only what the new examples
need: every stored model's margin on them, their gradient features under each TRAK checkpoint's
projection (the same seeds as the training features, so a query equal to a test example gets that
example's features), and the scores of every registered method that can score unseen examples
(``Method.score_new``: TRAK against the stored finalized training features, TracIn against its
stored Q-weighted features, representation similarity against the full-data model's stored
embeddings; datamodels cannot: a datamodel is one regression per known target).  No model is
trained and no training feature is recomputed.
A query without a label is attributed for the class the model trained on all data predicts
(``label_source = "predicted"``).  Results are a batch, keyed by the digest of the files' bytes:
scoring the same files again replaces that batch's rows and touches nothing else.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from ops.sources import IMAGE_SUFFIXES
from ops.spec import Spec
from ops.store import ArtifactError, ArtifactStore

Log = Callable[[str], None]
QUERIES = "queries"


class QueryError(ValueError):
    """A query file that cannot be read as the experiment's examples; the message names it."""


@dataclass
class Queries:
    images: np.ndarray          # uint8 N x H x W x C, the experiment's shape
    labels: np.ndarray          # int64, -1 where the file gives none
    ids: list[str]
    files: list[str]
    batch: str                  # digest of the files' bytes


def _decode(data: bytes, where: str, shape: tuple) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    h, w, c = shape
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("L" if c == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise QueryError(f"{where}: cannot decode the image: {e}") from None
    if img.size != (w, h):
        img = img.resize((w, h))
    a = np.asarray(img, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise QueryError(f"{path}: no such file or folder")
    out = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")
                 and (f.suffix.lower() in IMAGE_SUFFIXES or f.suffix.lower() == ".parquet"))
    if not out:
        raise QueryError(f"{path}: no image files or Parquet tables in it")
    return out


def read_queries(spec: Spec, store: ArtifactStore, exp: str, path: str | Path) -> Queries:
    """The query examples in ``path`` (a file or a folder), as the experiment's models see them."""
    import pyarrow.parquet as pq

    path = Path(path)
    meta = store.load_json(exp, "training_set", "meta.json")
    classes = [str(c) for c in meta["classes"]]
    shape = tuple(np.load(store.require(exp, "training_set", "train_images.npy"), mmap_mode="r").shape[1:])
    images, labels, ids, files = [], [], [], []
    digest = hashlib.sha256()
    for f in _files(path):
        data = f.read_bytes()
        digest.update(f.name.encode() + hashlib.sha256(data).digest())
        rel = f.name if f == path else f.relative_to(path).as_posix()
        if f.suffix.lower() == ".parquet":
            try:
                table = pq.read_table(io.BytesIO(data)).to_pydict()
            except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a bad file
                raise QueryError(f"{f}: not a readable Parquet table ({e})") from None
            col = spec.dataset.image_column
            if col not in table:
                raise QueryError(f"{f}: no column {col!r} (dataset.image_column; columns: {sorted(table)})")
            for i, v in enumerate(table[col]):
                blob = v["bytes"] if isinstance(v, dict) else v
                if blob is None:
                    raise QueryError(f"{f}: row {i} has no image")
                images.append(_decode(blob, f"{f}, row {i}", shape))
                lab = table.get(spec.dataset.label_column, [None] * (i + 1))[i]
                if lab is not None and str(lab) not in classes:
                    raise QueryError(f"{f}, row {i}: label {lab!r} is not one of the experiment's classes {classes}")
                labels.append(-1 if lab is None else classes.index(str(lab)))
                ids.append(str(table["id"][i]) if "id" in table and table["id"][i] is not None else f"{rel}#{i}")
                files.append(str(f))
        else:
            images.append(_decode(data, str(f), shape))
            parent = f.parent.name if f != path else None
            labels.append(classes.index(parent) if parent in classes else -1)
            ids.append(rel)
            files.append(str(f))
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise QueryError(f"{path}: query id {dup!r} appears twice")
    return Queries(np.stack(images), np.asarray(labels, np.int64), ids, files, digest.hexdigest()[:12])


def _normalized(images: np.ndarray, labels: np.ndarray, norm: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The images through the experiment's own loader pipeline (a temporary loader file, the
    Loader, the training normalization): exactly what the models saw for their own splits."""
    from kernels.dataloader import Loader
    from kernels.loader import LoaderFile, write_loader_file
    from kernels.transforms import Normalize, Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        f = LoaderFile(write_loader_file(Path(tmp) / "queries.pvl", {"image": images, "label": labels}))
        pipe = Pipeline([Normalize(tuple(norm["mean"]), tuple(norm["std"]))])
        batch = Loader(f, batch_size=len(f), order="sequential", pipelines={"image": pipe},
                       fields=("image", "label"), resident=True, device=device).fetch(np.arange(len(f)))
        return batch["image"].clone(), batch["label"].clone()


def score_queries(spec: Spec, store: ArtifactStore, exp: str, q: Queries, device, log: Log = lambda _: None) -> dict:
    """Margins, gradient features and TRAK scores of the queries; writes the batch's artifacts
    under ``queries/<batch>/`` and returns a summary."""
    from kernels.models import margin
    from kernels.npyio import NpyFile
    from kernels.projectors import make_projector
    from ops.attribution import _top_k
    from ops.methods import METHODS, Context, NewTargets
    from ops.training import load_member, model_factory

    device = torch.device(device)
    t0 = time.perf_counter()
    make_model, meta = model_factory(spec, store, exp)
    n_models = int(meta["models"])
    x, y = _normalized(q.images, np.maximum(q.labels, 0), json.loads(meta["norm"]), device)
    model = make_model().to(device).eval()

    def logits_of(i: int) -> torch.Tensor:           # one model's parameters at a time
        model.load_state_dict({kk: v.to(device) for kk, v in load_member(spec, store, exp, i).items()})
        with torch.no_grad():
            return torch.cat([model(x[r:r + 1024]) for r in range(0, len(x), 1024)]).float()

    logits_full = logits_of(n_models - 1)            # the model trained on all data labels the unlabeled
    y = torch.where(torch.from_numpy(q.labels).to(device) >= 0, y, logits_full.argmax(1))
    margins = np.stack([margin(logits_of(i) if i < n_models - 1 else logits_full, y).cpu().numpy()
                        for i in range(n_models)]).astype(np.float32)
    k_all, m_models = spec.trak.feature_dim, spec.trak.num_models
    sets = [None] + list(spec.trak.checkpoint_epochs)
    members = [(epoch, j) for epoch in sets for j in range(m_models)]
    budget = spec.trak.memory_gb * 2**30
    base = store.path(exp, QUERIES, q.batch)
    base.mkdir(parents=True, exist_ok=True)
    with store.atomic(exp, QUERIES, f"{q.batch}/features.npy") as p_feat:
        with NpyFile.create(p_feat, (len(members), len(y), k_all), np.float32) as feats:
            for i, (epoch, j) in enumerate(members):
                p = {kk: v.to(device) for kk, v in load_member(spec, store, exp, j, epoch).items()}
                proj = make_projector(spec.trak.projector, make_model().to(device), p, k_all, spec.seed * 100_003 + i,
                                      budget, device)
                c = proj.chunk(x)
                for r in range(0, len(x), c):
                    feats.write_rows(i, r, proj(x[r:r + c], y[r:r + c]).cpu().numpy())
    # every registered method that can score unseen examples, from its stored training side
    model.load_state_dict({kk: v.to(device) for kk, v in load_member(spec, store, exp, n_models - 1).items()})
    new = NewTargets(x, y, store.path(exp, QUERIES, f"{q.batch}/features.npy"), model)
    ctx = Context(spec, store, exp, device, log)
    train_ids = store.load_json(exp, "training_set", "meta.json")["train_ids"]
    tops, finite = [], True
    for name, method in METHODS.items():
        if not method.new_targets:
            continue
        with store.atomic(exp, QUERIES, f"{q.batch}/{name}_scores.npy") as p_scores:
            method.score_new(ctx, new, p_scores)
            with NpyFile(p_scores) as s:
                scores = s.read(0, len(y))
        finite &= bool(np.isfinite(scores).all())
        tops.append(_top_k(scores, spec.trak.top_k, exp, name, q.ids, train_ids))
    top = pl.concat(tops)
    top = top.with_columns(batch=pl.lit(q.batch),
                           source_file=pl.Series(np.asarray(q.files)[top["target_index"].to_numpy()]))
    top = top.rename({"target_index": "query_index", "target_id": "query_id"})
    top = top.select("experiment", "batch", *[c for c in top.columns if c not in ("experiment", "batch")])
    classes = [str(c) for c in store.load_json(exp, "training_set", "meta.json")["classes"]]
    rows = pl.DataFrame({"experiment": exp, "batch": q.batch, "query_index": np.arange(len(y)), "query_id": q.ids,
                         "source_file": q.files, "label": y.cpu().numpy().astype(np.int64),
                         "class_name": [classes[int(v)] for v in y.cpu().numpy()],
                         "label_source": np.where(q.labels >= 0, "given", "predicted"),
                         "predicted": logits_full.argmax(1).cpu().numpy().astype(np.int64),
                         "margin_full": margins[-1].astype(np.float64),
                         "margin_mean": margins.mean(0).astype(np.float64),
                         "scored_at": datetime.now(timezone.utc).replace(tzinfo=None)})
    store.save_npy(exp, QUERIES, f"{q.batch}/margins.npy", margins)
    store.save_table(exp, QUERIES, f"{q.batch}/queries.parquet", rows)
    store.save_table(exp, QUERIES, f"{q.batch}/top_attributions.parquet", top)
    finite &= bool(np.isfinite(margins).all())
    if not finite:
        raise ArtifactError(f"{base}: non-finite margins or scores for the queries")
    seconds = time.perf_counter() - t0
    log(f"scored {len(y)} queries (batch {q.batch}) against {len(train_ids)} training examples with "
        f"{len(members)} checkpoints in {seconds:.1f}s")
    return {"batch": q.batch, "queries": len(y), "checkpoints": len(members), "seconds": round(seconds, 2),
            "methods": sorted(top["method"].unique()),
            "queries_table": rows, "top": top}
