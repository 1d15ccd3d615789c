"""TRAK features and scores, datamodels, and the linear datamodeling score."""
from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kernels.lasso import fit_datamodels
from kernels.stats import lds
from kernels.npyio import NpyFile
from kernels.projectors import batched_out_to_loss, make_projector
from kernels.trak import finalize_member, score_tiles
from ops.data import MASKS
from ops.spec import Spec
from ops.store import ArtifactError, ArtifactStore
from ops.training import Data, load_member, model_factory

FEAT, SCORES, DM, LDS = "gradient_features", "attribution_scores", "datamodel_weights", "lds_evaluation"
Log = Callable[[str], None]


def gradient_features(spec: Spec, store: ArtifactStore, exp: str, device: torch.device, log: Log) -> dict:
    """Projected margin gradients of train and test examples, and Q, for the first M models: their
    final checkpoints, then (``trak.checkpoint_epochs``) the same models after earlier epochs.
    Every checkpoint is one member of TRAK's ensemble, with its own projection (``trak.projector``).
    Memory: one checkpoint's parameters, per-example work in chunks sized from ``trak.memory_gb``,
    features written to the .npy files block by block."""
    make_model, meta = model_factory(spec, store, exp)
    data = Data(store, exp, device, norm=json.loads(meta["norm"]))
    model = make_model().to(device)
    k, n_models = spec.trak.proj_dim, spec.trak.num_models
    sets = [("final", None)] + [(f"epoch {e}", e) for e in spec.trak.checkpoint_epochs]
    members = [(epoch, i) for _, epoch in sets for i in range(n_models)]
    m = len(members)
    n, t = len(data.y), len(data.yt)
    budget = spec.trak.memory_gb * 2**30
    t0 = time.perf_counter()
    finite = True
    chunk = None
    with store.atomic(exp, FEAT, "train.npy") as p_train, store.atomic(exp, FEAT, "test.npy") as p_test, \
            store.atomic(exp, FEAT, "out_to_loss.npy") as p_q:
        with NpyFile.create(p_train, (m, n, k), np.float32) as train, NpyFile.create(p_test, (m, t, k), np.float32) \
                as test, NpyFile.create(p_q, (m, n), np.float32) as q:
            for i, (epoch, j) in enumerate(members):
                p = {kk: v.to(device) for kk, v in load_member(spec, store, exp, j, epoch).items()}
                proj = make_projector(spec.trak.projector, model, p, k, spec.seed * 100_003 + i, budget, device)
                chunk = proj.chunk(data.x)
                for out, x, y in ((train, data.x, data.y), (test, data.xt, data.yt)):
                    for r in range(0, len(x), chunk):
                        f = proj(x[r:r + chunk], y[r:r + chunk]).cpu().numpy()
                        finite &= bool(np.isfinite(f).all())
                        out.write_rows(i, r, f)
                qi = batched_out_to_loss(model, p, data.x, data.y, batch=max(chunk, 256)).cpu().numpy()
                finite &= bool(np.isfinite(qi).all())
                q.write(i, qi[None])
                if (i + 1) % max(1, m // 8) == 0 or i + 1 == m:
                    log(f"featurized {i + 1}/{m} checkpoints ({time.perf_counter() - t0:.1f}s, "
                        f"{(i + 1) * (n + t) / (time.perf_counter() - t0):.0f} examples/s)")
    seconds = time.perf_counter() - t0
    return {"checkpoints": m, "models": n_models, "checkpoint_sets": [name for name, _ in sets],
            "projector": spec.trak.projector, "proj_dim": k, "train_examples": n, "test_examples": t,
            "chunk": chunk, "parameters": sum(v.numel() for v in model.parameters()), "finite": finite,
            "seconds": round(seconds, 1), "examples_per_second": round(m * (n + t) / max(seconds, 1e-9), 1)}


def _top_k(scores: np.ndarray, k: int, exp: str, method: str, target_ids, train_ids, offset: int = 0) -> pd.DataFrame:
    """Top-k most supporting training examples per target (scores: targets x train; its rows are
    targets offset, offset+1, ...)."""
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, idx, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    t = scores.shape[0]
    target_index = np.repeat(np.arange(offset, offset + t), k)
    return pd.DataFrame({"experiment": exp, "method": method, "target_index": target_index,
                         "target_id": np.asarray(target_ids)[target_index], "rank": np.tile(np.arange(1, k + 1), t),
                         "train_index": idx.ravel(), "train_id": np.asarray(train_ids)[idx.ravel()],
                         "score": vals.ravel().astype(np.float64)})


def score_targets(spec: Spec, store: ArtifactStore, exp: str, targets: NpyFile, out_path, device,
                  log: Log = lambda _: None) -> tuple[int, int]:
    """TRAK scores of target features ``targets`` ([M, t, k], one block per checkpoint, from the same
    projections as the training features) against the stored training features, written to
    ``out_path`` as a [t, n] float32 .npy; nothing about the training set is recomputed.  The test
    split, the training set itself (train x train for the detector) and new examples all go
    through here.  Returns (t, n)."""
    with NpyFile(store.require(exp, SCORES, "train_features.npy")) as feats:
        if targets.shape[0] != feats.shape[0] or targets.shape[2] != feats.shape[2]:
            raise ArtifactError(f"{targets.path}: target features of shape {targets.shape} do not match the stored "
                                f"training features {feats.shape} (checkpoints x examples x k)")
        q = np.asarray(store.load_npy(exp, SCORES, "q_mean.npy"), np.float64)
        t0 = time.perf_counter()
        with NpyFile.create(out_path, (targets.shape[1], feats.shape[1]), np.float32) as out:
            score_tiles(targets, feats, q, out, device, spec.trak.memory_gb * 2**30,
                        on_block=lambda i, t: log(f"scored {i}/{t} targets ({time.perf_counter() - t0:.1f}s)"))
        return targets.shape[1], feats.shape[1]


def attribution_scores(spec: Spec, store: ArtifactStore, exp: str, log: Log, device=None) -> dict:
    """Finalized training features F_m = Φ_m(Φ_mᵀΦ_m + λI)^{-1} and mean Q (what new targets are
    scored against), then test x train and train x train scores, block by block."""
    device = torch.device("cpu") if device is None else torch.device(device)
    with NpyFile(store.require(exp, FEAT, "train.npy")) as train:
        m, n, k = train.shape
        with store.atomic(exp, SCORES, "train_features.npy") as tmp:
            with NpyFile.create(tmp, (m, n, k), np.float32) as out:
                for i in range(m):
                    finalize_member(train, i, spec.trak.lam, out, device)
        with NpyFile(store.require(exp, FEAT, "out_to_loss.npy")) as qf:
            q = np.zeros(n)
            for i in range(m):
                q += qf.read(i, i + 1)[0]
        store.save_npy(exp, SCORES, "q_mean.npy", q / m)
        log(f"finalized {m} checkpoints' training features")
        with NpyFile(store.require(exp, FEAT, "test.npy")) as test, \
                store.atomic(exp, SCORES, "test_x_train.npy") as tmp:
            t, _ = score_targets(spec, store, exp, test, tmp, device, log)
        with store.atomic(exp, SCORES, "train_x_train.npy") as tmp:
            score_targets(spec, store, exp, train, tmp, device, log)
    meta = store.load_json(exp, "training_set", "meta.json")
    finite = True
    tables = []
    with NpyFile(store.require(exp, SCORES, "test_x_train.npy")) as s_test:
        rows = max(1, int(spec.trak.memory_gb * 2**30 / 4 / (8 * n)))
        for r in range(0, t, rows):
            block = s_test.read(r, r + rows)
            finite &= bool(np.isfinite(block).all())
            tables.append(_top_k(block, spec.trak.top_k, exp, "trak", meta["test_ids"], meta["train_ids"], offset=r))
    with NpyFile(store.require(exp, SCORES, "train_x_train.npy")) as s_train:
        rows = max(1, int(spec.trak.memory_gb * 2**30 / 4 / (4 * n)))
        for r in range(0, n, rows):
            finite &= bool(np.isfinite(s_train.read(r, r + rows)).all())
    store.save_table(exp, SCORES, "top_attributions.parquet", pd.concat(tables, ignore_index=True))
    return {"targets": t, "train": n, "checkpoints": m, "finite": finite, "lambda_rel": spec.trak.lam}


def _roles(store: ArtifactStore, exp: str):
    masks = np.asarray(store.load_npy(exp, MASKS, "masks.npy"))
    roles = store.load_table(exp, MASKS, "masks.parquet")["role"].to_numpy()
    margins = np.asarray(store.load_npy(exp, "model_outputs", "margins_test.npy"))[: len(masks)]
    return masks, roles, margins


def _fit_val(spec: Spec, models: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A seeded share (datamodels.val_fraction) of ``models`` to choose λ on, the rest to fit."""
    perm = np.random.default_rng([spec.seed, 23]).permutation(models)
    n_val = max(1, int(round(spec.datamodels.val_fraction * len(models))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _fit(spec: Spec, masks, margins, fit, val, log: Log, what: str):
    t0 = time.perf_counter()
    return fit_datamodels(masks[fit], margins[fit], masks[val], margins[val],
                          n_lambdas=spec.datamodels.n_lambdas, eps=spec.datamodels.eps,
                          tol=spec.datamodels.tol, memory_mb=spec.datamodels.memory_mb,
                          solver=spec.datamodels.solver, max_iter=spec.datamodels.max_iter,
                          on_step=lambda i, k: log(f"{what}: path step {i}/{k} ({time.perf_counter() - t0:.1f}s)"))


def datamodels_train_x_train(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> np.ndarray:
    """Datamodels whose targets are the training examples (the strongest-feature paper's input):
    every training example's margin across all subset models regressed on the masks, its own mask
    column included (it takes the effect of being trained on).  Rows = targets, columns = training
    examples, float64 n x n; the diagonal is that self effect."""
    masks = np.asarray(store.load_npy(exp, MASKS, "masks.npy"))
    margins = np.asarray(store.load_npy(exp, "model_outputs", "margins_train.npy"))[: len(masks)]
    fit, val = _fit_val(spec, np.arange(len(masks)))
    res = _fit(spec, masks, margins, fit, val, log, "datamodels (train x train)")
    return np.ascontiguousarray(res.weight.T, np.float64)


def datamodel_weights(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> dict:
    masks, roles, margins = _roles(store, exp)
    fit, val = _fit_val(spec, np.flatnonzero(roles == "train"))
    t0 = time.perf_counter()
    res = _fit(spec, masks, margins, fit, val, log, "datamodels")
    store.save_npy(exp, DM, "weight.npy", res.weight)      # train x targets
    store.save_npy(exp, DM, "bias.npy", res.bias)
    store.save_npy(exp, DM, "lambda.npy", res.lam)
    meta = store.load_json(exp, "training_set", "meta.json")
    w = res.weight
    nz_train, nz_target = np.nonzero(w)
    store.save_table(exp, DM, "weights.parquet", pd.DataFrame({
        "experiment": exp, "target_index": nz_target, "target_id": np.asarray(meta["test_ids"])[nz_target],
        "train_index": nz_train, "train_id": np.asarray(meta["train_ids"])[nz_train],
        "weight": w[nz_train, nz_target].astype(np.float64)}))
    store.save_table(exp, DM, "top_attributions.parquet",
                     _top_k(np.ascontiguousarray(w.T), spec.trak.top_k, exp, "datamodels",
                            meta["test_ids"], meta["train_ids"]))
    nnz = (w != 0).sum(0)
    not_converged = int((~res.converged).sum())
    if not_converged:
        log(f"datamodels: {not_converged} of {w.shape[1]} targets did not reach the duality gap "
            f"{spec.datamodels.tol:g} (worst {float(res.gap.max()):.2g})")
    return {"fit_models": len(fit), "val_models": len(val), "targets": w.shape[1],
            "mean_nonzero": float(nnz.mean()), "not_converged": not_converged,
            "max_relative_gap": float(res.gap.max()), "seconds": round(time.perf_counter() - t0, 1)}


def _predict_blocks(path, masks: np.ndarray, memory_gb: float) -> np.ndarray:
    """masks @ scoresᵀ (held-out models x targets) with the targets x train scores read by row blocks."""
    with NpyFile(path) as f:
        t, n = f.shape
        out = np.empty((len(masks), t))
        rows = max(1, int(memory_gb * 2**30 / 4 / (8 * n)))
        for r in range(0, t, rows):
            out[:, r:r + rows] = masks @ f.read(r, r + rows).astype(np.float64).T
    return out


def lds_evaluation(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> dict:
    masks, roles, margins = _roles(store, exp)
    held = np.flatnonzero(roles == "heldout")
    x = masks[held].astype(np.float64)
    actual = margins[held]
    w = np.asarray(store.load_npy(exp, DM, "weight.npy"), np.float64)
    b = np.asarray(store.load_npy(exp, DM, "bias.npy"), np.float64)
    preds = {"trak": _predict_blocks(store.require(exp, SCORES, "test_x_train.npy"), x, spec.trak.memory_gb),
             "datamodels": x @ w + b}
    rows, per_target = [], []
    for method, pred in preds.items():
        value, half, rho = lds(pred, actual)
        rows.append({"experiment": exp, "method": method, "lds": value, "ci95_low": value - half,
                     "ci95_high": value + half, "n_heldout": len(held), "n_targets": actual.shape[1]})
        per_target.append(pd.DataFrame({"experiment": exp, "method": method,
                                        "target_index": np.arange(len(rho)), "spearman": rho}))
        log(f"LDS {method}: {value:.3f} ± {half:.3f} over {actual.shape[1]} targets, {len(held)} held-out models")
    table = pd.DataFrame(rows)
    store.save_table(exp, LDS, "lds.parquet", table)
    store.save_table(exp, LDS, "lds_per_target.parquet", pd.concat(per_target, ignore_index=True))
    return {"n_heldout": len(held), **{f"lds_{r['method']}": round(r["lds"], 4) for r in rows}}
