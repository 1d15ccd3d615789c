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
from kernels.trak import TrakAccumulator, featurize, out_to_loss
from kernels.train import unstack
from ops.data import MASKS
from ops.spec import Spec
from ops.store import ArtifactStore
from ops.training import Data, load_models, load_snapshot

FEAT, SCORES, DM, LDS = "gradient_features", "attribution_scores", "datamodel_weights", "lds_evaluation"
Log = Callable[[str], None]


def gradient_features(spec: Spec, store: ArtifactStore, exp: str, device: torch.device, log: Log) -> dict:
    """Projected margin gradients of train and test examples, and Q, for the first M models: their
    final checkpoints, then (``trak.checkpoint_epochs``) the same models after earlier epochs.
    Every checkpoint is one member of TRAK's ensemble, with its own projection."""
    make_model, params, meta = load_models(spec, store, exp)
    data = Data(store, exp, device, norm=json.loads(meta["norm"]))
    model = make_model().to(device)
    k, n_models = spec.trak.proj_dim, spec.trak.num_models
    stacks = [("final", params)] + [(f"epoch {e}", load_snapshot(spec, store, exp, e))
                                    for e in spec.trak.checkpoint_epochs]
    members = [(stack, i) for _, stack in stacks for i in range(n_models)]
    m = len(members)
    n, t = len(data.y), len(data.yt)
    t0 = time.perf_counter()
    finite = True
    with store.open_npy(exp, FEAT, "train.npy", (m, n, k), np.float32) as train, \
            store.open_npy(exp, FEAT, "test.npy", (m, t, k), np.float32) as test, \
            store.open_npy(exp, FEAT, "out_to_loss.npy", (m, n), np.float32) as q:
        for i, (stack, j) in enumerate(members):
            p = {kk: v.to(device) for kk, v in unstack(stack, j).items()}
            seed = spec.seed * 100_003 + i
            train[i] = featurize(model, p, data.x, data.y, k, seed).cpu().numpy()
            test[i] = featurize(model, p, data.xt, data.yt, k, seed).cpu().numpy()
            q[i] = out_to_loss(model, p, data.x, data.y).cpu().numpy()
            finite &= bool(np.isfinite(train[i]).all() and np.isfinite(test[i]).all() and np.isfinite(q[i]).all())
            if (i + 1) % max(1, m // 8) == 0 or i + 1 == m:
                log(f"featurized {i + 1}/{m} checkpoints ({time.perf_counter() - t0:.1f}s)")
    n_params = sum(v[0].numel() for v in params.values())
    return {"checkpoints": m, "models": n_models, "checkpoint_sets": [name for name, _ in stacks],
            "proj_dim": k, "train_examples": n, "test_examples": t,
            "parameters": n_params, "finite": finite, "seconds": round(time.perf_counter() - t0, 1)}


def _top_k(scores: np.ndarray, k: int, exp: str, method: str, target_ids, train_ids) -> pd.DataFrame:
    """Top-k most supporting training examples per target (scores: targets x train)."""
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, idx, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    t = scores.shape[0]
    target_index = np.repeat(np.arange(t), k)
    return pd.DataFrame({"experiment": exp, "method": method, "target_index": target_index,
                         "target_id": np.asarray(target_ids)[target_index], "rank": np.tile(np.arange(1, k + 1), t),
                         "train_index": idx.ravel(), "train_id": np.asarray(train_ids)[idx.ravel()],
                         "score": vals.ravel().astype(np.float64)})


def attribution_scores(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> dict:
    train = store.load_npy(exp, FEAT, "train.npy")
    test = store.load_npy(exp, FEAT, "test.npy")
    q = store.load_npy(exp, FEAT, "out_to_loss.npy")
    acc_test, acc_train = TrakAccumulator(spec.trak.lam), TrakAccumulator(spec.trak.lam)
    for i in range(len(train)):
        acc_test.add(train[i], test[i], q[i])
        acc_train.add(train[i], train[i], q[i])
    scores_test, scores_train = acc_test.scores(), acc_train.scores()
    store.save_npy(exp, SCORES, "test_x_train.npy", scores_test)
    store.save_npy(exp, SCORES, "train_x_train.npy", scores_train)
    store.save_npy(exp, SCORES, "q_mean.npy", np.asarray(q, np.float64).mean(0))
    meta = store.load_json(exp, "training_set", "meta.json")
    store.save_table(exp, SCORES, "top_attributions.parquet",
                     _top_k(scores_test, spec.trak.top_k, exp, "trak", meta["test_ids"], meta["train_ids"]))
    finite = bool(np.isfinite(scores_test).all() and np.isfinite(scores_train).all())
    return {"targets": scores_test.shape[0], "train": scores_test.shape[1], "checkpoints": len(train),
            "finite": finite, "lambda_rel": spec.trak.lam}


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


def lds_evaluation(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> dict:
    masks, roles, margins = _roles(store, exp)
    held = np.flatnonzero(roles == "heldout")
    x = masks[held].astype(np.float64)
    actual = margins[held]
    tau = np.asarray(store.load_npy(exp, SCORES, "test_x_train.npy"), np.float64)
    w = np.asarray(store.load_npy(exp, DM, "weight.npy"), np.float64)
    b = np.asarray(store.load_npy(exp, DM, "bias.npy"), np.float64)
    preds = {"trak": x @ tau.T, "datamodels": x @ w + b}
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
