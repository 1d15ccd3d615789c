"""TRAK features and scores, datamodels, and the linear datamodeling score."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from kernels.lasso import fit_datamodels
from kernels.npyio import NpyFile
from kernels.projectors import batched_out_to_loss, make_projector
from kernels.stats import lds, lds_bootstrap, spearman_columns
from kernels.trak import finalize_member, grid_scores, score_tiles
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
    k, n_models = spec.trak.feature_dim, spec.trak.num_models
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
        from ops.progress import bar

        with NpyFile.create(p_train, (m, n, k), np.float32) as train, NpyFile.create(p_test, (m, t, k), np.float32) \
                as test, NpyFile.create(p_q, (m, n), np.float32) as q, \
                bar(m, f"featurizing {n + t} examples", "checkpoint") as shown:
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
                shown.update(1)
                if (i + 1) % max(1, m // 8) == 0 or i + 1 == m:
                    log(f"featurized {i + 1}/{m} checkpoints ({time.perf_counter() - t0:.1f}s, "
                        f"{(i + 1) * (n + t) / (time.perf_counter() - t0):.0f} examples/s)")
    seconds = time.perf_counter() - t0
    return {"checkpoints": m, "models": n_models, "checkpoint_sets": [name for name, _ in sets],
            "projector": spec.trak.projector, "proj_dim": k, "train_examples": n, "test_examples": t,
            "chunk": chunk, "parameters": sum(v.numel() for v in model.parameters()), "finite": finite,
            "seconds": round(seconds, 1), "examples_per_second": round(m * (n + t) / max(seconds, 1e-9), 1)}


def _top_k(scores: np.ndarray, k: int, exp: str, method: str, target_ids, train_ids, offset: int = 0) -> pl.DataFrame:
    """Top-k most supporting training examples per target (scores: targets x train; its rows are
    targets offset, offset+1, ...)."""
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, idx, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    t = scores.shape[0]
    target_index = np.repeat(np.arange(offset, offset + t), k)
    return pl.DataFrame({"experiment": exp, "method": method, "target_index": target_index,
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
        if targets.shape[0] != feats.shape[0] or targets.shape[2] < feats.shape[2]:
            raise ArtifactError(f"{targets.path}: target features of shape {targets.shape} do not match the stored "
                                f"training features {feats.shape} (checkpoints x examples x k)")
        q = np.asarray(store.load_npy(exp, SCORES, "q_mean.npy"), np.float64)
        t0 = time.perf_counter()
        with NpyFile.create(out_path, (targets.shape[1], feats.shape[1]), np.float32) as out:
            score_tiles(targets, feats, q, out, device, spec.trak.memory_gb * 2**30,
                        on_block=lambda i, t: log(f"scored {i}/{t} targets ({time.perf_counter() - t0:.1f}s)"))
        return targets.shape[1], feats.shape[1]


def rank_table(spec: Spec, store: ArtifactStore, exp: str, scores_path, method: str, asset: str, name: str) -> bool:
    """The top ``trak.top_k`` training examples of every target of a [targets, train] score file,
    read by row blocks, saved as the Parquet ``<asset>/<name>`` (warehouse ``attributions``).  Returns whether
    every score was finite."""
    meta = store.load_json(exp, "training_set", "meta.json")
    finite, tables = True, []
    with NpyFile(scores_path) as f:
        t, n = f.shape
        rows = max(1, int(spec.trak.memory_gb * 2**30 / 4 / (8 * n)))
        for r in range(0, t, rows):
            block = f.read(r, r + rows)
            finite &= bool(np.isfinite(block).all())
            tables.append(_top_k(block, spec.trak.top_k, exp, method, meta["test_ids"], meta["train_ids"], offset=r))
    store.save_table(exp, asset, name, pl.concat(tables))
    return finite


def score_and_rank(ctx, method, targets: NpyFile, features_path, q: np.ndarray) -> dict:
    """A feature-based method's test x train scores (``score_tiles`` of ``targets`` against the
    training-side features at ``features_path``, times ``q``) and its top-attributions table, under
    the method's asset folder (``<asset>/<method>/``)."""
    spec, store, exp = ctx.spec, ctx.store, ctx.exp
    t0 = time.perf_counter()
    with NpyFile(features_path) as feats, store.atomic(exp, method.asset, f"{method.name}/test_x_train.npy") as tmp:
        with NpyFile.create(tmp, (targets.shape[1], feats.shape[1]), np.float32) as out:
            score_tiles(targets, feats, q, out, ctx.device, spec.trak.memory_gb * 2**30)
        shape = (targets.shape[1], feats.shape[1])
    finite = rank_table(spec, store, exp, store.require(exp, method.asset, f"{method.name}/test_x_train.npy"),
                        method.name, method.asset, f"{method.name}/top_attributions.parquet")
    ctx.log(f"{method.name}: scored {shape[0]} targets against {shape[1]} training examples "
            f"({time.perf_counter() - t0:.1f}s)")
    return {f"{method.name}_finite": finite, f"{method.name}_seconds": round(time.perf_counter() - t0, 1)}


def baseline_attributions(spec: Spec, store: ArtifactStore, exp: str, device, log: Log) -> dict:
    """Every registered method computed by the baseline_attributions asset (TracIn, representation
    similarity): their training-side features, test x train scores and top attributions."""
    from ops.methods import METHODS, Context

    ctx = Context(spec, store, exp, device, log)
    out = {}
    for name, method in METHODS.items():
        if method.asset == "baseline_attributions":
            out.update(method.fit(ctx))
    out["finite"] = all(v for k, v in out.items() if k.endswith("_finite"))
    return out


SELECTION = "selection.json"


def trak_choice(spec: Spec, store: ArtifactStore, exp: str) -> tuple[int, float]:
    """(k, λ) TRAK's scores use: the spec's, or what attribution_scores chose for ``auto``."""
    if spec.trak.proj_dim != "auto" and spec.trak.lam != "auto":
        return spec.trak.proj_dim, spec.trak.lam
    chosen = store.load_json(exp, SCORES, SELECTION)
    return int(chosen["proj_dim"]), float(chosen["lam"])


def heldout_split(spec: Spec, store: ArtifactStore, exp: str, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(models that chose auto k/λ, models the LDS is reported on); all report when nothing was chosen."""
    if spec.trak.proj_dim != "auto" and spec.trak.lam != "auto":
        return held[:0], held
    chosen = store.load_json(exp, SCORES, SELECTION)
    return np.asarray(chosen["select_models"], int), np.asarray(chosen["eval_models"], int)


def select_trak(spec: Spec, store: ArtifactStore, exp: str, device, log: Log) -> dict:
    """Choose ``trak.proj_dim: auto`` from proj_dim_grid and ``trak.lam: auto`` from lam_grid by LDS on
    a seeded share (``trak.select_fraction``) of the held-out models, on a seeded sample of at most
    ``trak.select_targets`` targets; the other held-out models are left for reporting LDS."""
    t0 = time.perf_counter()
    masks, roles, margins = _roles(store, exp)
    held = np.flatnonzero(roles == "heldout")
    rng = np.random.default_rng([spec.seed, 29])
    perm = rng.permutation(held)
    n_sel = min(len(held) - 1, max(2, int(round(spec.trak.select_fraction * len(held)))))
    sel, rest = np.sort(perm[:n_sel]), np.sort(perm[n_sel:])
    ks = spec.trak.proj_dim_grid if spec.trak.proj_dim == "auto" else [spec.trak.proj_dim]
    lams = spec.trak.lam_grid if spec.trak.lam == "auto" else [spec.trak.lam]
    with NpyFile(store.require(exp, FEAT, "train.npy")) as train, NpyFile(store.require(exp, FEAT, "test.npy")) as test, \
            NpyFile(store.require(exp, FEAT, "out_to_loss.npy")) as qf:
        ks = [k for k in ks if k <= train.shape[2]]
        t = test.shape[1]
        rows = np.sort(rng.choice(t, size=min(t, spec.trak.select_targets), replace=False))
        q = np.mean([qf.read(i, i + 1)[0] for i in range(qf.shape[0])], 0)
        x, actual = masks[sel].astype(np.float64), margins[sel][:, rows]
        grid = []
        for (k, lam), scores in grid_scores(train, test, rows, q, ks, lams, device):
            value, _, _ = lds(x @ scores.astype(np.float64).T, actual)
            grid.append({"proj_dim": k, "lam": lam, "lds_select": value})
            log(f"auto: k={k}, λ={lam:g}: LDS {value:.3f} on {len(sel)} selection models")
    best = max(grid, key=lambda g: (round(g["lds_select"], 6), -g["proj_dim"]))
    chosen = {"proj_dim": best["proj_dim"], "lam": best["lam"], "lds_select": best["lds_select"], "grid": grid,
              "select_models": sel.tolist(), "eval_models": rest.tolist(), "select_targets": len(rows),
              "seconds": round(time.perf_counter() - t0, 1)}
    store.save_json(exp, SCORES, SELECTION, chosen)
    log(f"auto: chose k={best['proj_dim']}, λ={best['lam']:g} (LDS {best['lds_select']:.3f} on {len(sel)} selection "
        f"models); LDS is reported on the other {len(rest)}")
    return chosen


def attribution_scores(spec: Spec, store: ArtifactStore, exp: str, log: Log, device=None) -> dict:
    """Finalized training features F_m = Φ_m(Φ_mᵀΦ_m + λI)^{-1} and mean Q (what new targets are
    scored against), then test x train and train x train scores, block by block."""
    device = torch.device("cpu") if device is None else torch.device(device)
    chosen = select_trak(spec, store, exp, device, log) \
        if "auto" in (spec.trak.proj_dim, spec.trak.lam) else None
    k, lam = trak_choice(spec, store, exp)
    with NpyFile(store.require(exp, FEAT, "train.npy")) as train:
        m, n, _ = train.shape
        with store.atomic(exp, SCORES, "train_features.npy") as tmp:
            with NpyFile.create(tmp, (m, n, k), np.float32) as out:
                for i in range(m):
                    finalize_member(train, i, lam, out, device, cols=k)
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
    finite = rank_table(spec, store, exp, store.require(exp, SCORES, "test_x_train.npy"), "trak", SCORES,
                        "top_attributions.parquet")
    with NpyFile(store.require(exp, SCORES, "train_x_train.npy")) as s_train:
        rows = max(1, int(spec.trak.memory_gb * 2**30 / 4 / (4 * n)))
        for r in range(0, n, rows):
            finite &= bool(np.isfinite(s_train.read(r, r + rows)).all())
    out = {"targets": t, "train": n, "checkpoints": m, "finite": finite, "proj_dim": k, "lambda_rel": lam}
    if chosen:
        out.update(auto_lds_select=round(chosen["lds_select"], 4), auto_grid=chosen["grid"],
                   auto_select_models=len(chosen["select_models"]), auto_eval_models=len(chosen["eval_models"]))
    return out


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


def _fit(spec: Spec, masks, margins, fit, val, log: Log, what: str, device="cpu"):
    t0 = time.perf_counter()
    return fit_datamodels(masks[fit], margins[fit], masks[val], margins[val],
                          n_lambdas=spec.datamodels.n_lambdas, eps=spec.datamodels.eps,
                          tol=spec.datamodels.tol, memory_mb=spec.datamodels.memory_mb,
                          solver=spec.datamodels.solver, max_iter=spec.datamodels.max_iter, device=str(device),
                          on_step=lambda i, k: log(f"{what}: path step {i}/{k} ({time.perf_counter() - t0:.1f}s)"))


def datamodels_train_x_train(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> np.ndarray:
    """Datamodels whose targets are the training examples (the strongest-feature paper's input):
    every training example's margin across all subset models regressed on the masks, its own mask
    column included (it takes the effect of being trained on).  Rows = targets, columns = training
    examples, float32 n x n (as the fit stores its weights); the diagonal is that self effect."""
    masks = np.asarray(store.load_npy(exp, MASKS, "masks.npy"))
    margins = np.asarray(store.load_npy(exp, "model_outputs", "margins_train.npy"))[: len(masks)]
    fit, val = _fit_val(spec, np.arange(len(masks)))
    res = _fit(spec, masks, margins, fit, val, log, "datamodels (train x train)")
    return np.ascontiguousarray(res.weight.T, np.float32)


def datamodel_weights(spec: Spec, store: ArtifactStore, exp: str, log: Log, device="cpu") -> dict:
    masks, roles, margins = _roles(store, exp)
    fit, val = _fit_val(spec, np.flatnonzero(roles == "train"))
    t0 = time.perf_counter()
    res = _fit(spec, masks, margins, fit, val, log, "datamodels", device)
    store.save_npy(exp, DM, "weight.npy", res.weight)      # train x targets
    store.save_npy(exp, DM, "bias.npy", res.bias)
    store.save_npy(exp, DM, "lambda.npy", res.lam)
    meta = store.load_json(exp, "training_set", "meta.json")
    w = res.weight
    nz_train, nz_target = np.nonzero(w)
    store.save_table(exp, DM, "weights.parquet", pl.DataFrame({
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
    """LDS of every registered method (ops/methods) on the held-out models, with a bootstrap
    interval over held-out models and targets; and LDS against the number of models for TRAK
    (the first m ensemble members) and datamodels (refitted on the first m subset models)."""
    from ops.methods import METHODS, Context

    ctx = Context(spec, store, exp, "cpu", log)
    masks, roles, margins = _roles(store, exp)
    chose, held = heldout_split(spec, store, exp, np.flatnonzero(roles == "heldout"))
    if len(chose):
        log(f"LDS on the {len(held)} held-out models that did not choose TRAK's auto k/λ ({len(chose)} did)")
    x = masks[held].astype(np.float64)
    actual = margins[held]
    rows, per_target = [], []
    undefined = {}
    for name, method in METHODS.items():
        pred = method.predict(ctx, x)
        # a target whose prediction or margin is constant over the held-out models has no rank
        # correlation; it counts 0 in the LDS, and the share of such targets is reported (check)
        undefined[name] = float(np.isnan(spearman_columns(pred, actual)).mean()) if pred.size else 1.0
        value, low, high, rho = lds_bootstrap(pred, actual, n_boot=spec.lds.bootstrap, seed=spec.seed)
        rows.append({"experiment": exp, "method": name, "lds": value, "ci95_low": low, "ci95_high": high,
                     "n_heldout": len(held), "n_targets": actual.shape[1]})
        per_target.append(pl.DataFrame({"experiment": exp, "method": name,
                                        "target_index": np.arange(len(rho)), "spearman": rho}))
        log(f"LDS {name}: {value:.3f} [{low:.3f}, {high:.3f}] over {actual.shape[1]} targets, "
            f"{len(held)} held-out models")
    curve = lds_curve(spec, store, exp, x, actual, log)
    store.save_table(exp, LDS, "lds.parquet", pl.DataFrame(rows))
    store.save_table(exp, LDS, "lds_per_target.parquet", pl.concat(per_target))
    store.save_table(exp, LDS, "lds_curve.parquet", curve)
    return {"n_heldout": len(held), **{f"lds_{r['method']}": round(r["lds"], 4) for r in rows},
            "undefined_targets": undefined, "curve": curve}


def _curve_sizes(total: int) -> list[int]:
    return sorted({m for m in (1, 2, 5, 10, 20, 50, 100, 200, 500) if m < total} | {total})


def lds_curve(spec: Spec, store: ArtifactStore, exp: str, x: np.ndarray, actual: np.ndarray, log: Log) -> pl.DataFrame:
    """LDS against the number of models: TRAK with its first m checkpoints (the stored features,
    rescored), datamodels refitted on the first m of its fitting models (λ still chosen on its
    validation models)."""
    rows = []
    with NpyFile(store.require(exp, FEAT, "test.npy")) as test, \
            NpyFile(store.require(exp, SCORES, "train_features.npy")) as feats, \
            NpyFile(store.require(exp, FEAT, "out_to_loss.npy")) as qf:
        for m in _curve_sizes(feats.shape[0]):
            q = np.mean([qf.read(i, i + 1)[0] for i in range(m)], 0)
            with store.atomic(exp, LDS, "curve_scores.npy") as tmp:
                with NpyFile.create(tmp, (test.shape[1], feats.shape[1]), np.float32) as out:
                    score_tiles(test, feats, q, out, "cpu", spec.trak.memory_gb * 2**30, members=list(range(m)))
                value, low, high, _ = lds_bootstrap(_predict_blocks(tmp, x, spec.trak.memory_gb), actual,
                                                    n_boot=spec.lds.bootstrap, seed=spec.seed)
            rows.append({"experiment": exp, "method": "trak", "num_models": m, "lds": value, "ci95_low": low,
                         "ci95_high": high})
    store.path(exp, LDS, "curve_scores.npy").unlink(missing_ok=True)
    masks, roles, margins = _roles(store, exp)
    fit, val = _fit_val(spec, np.flatnonzero(roles == "train"))
    for m in _curve_sizes(len(fit)):
        if m < 2:
            continue
        if m == len(fit) and store.path(exp, DM, "weight.npy").exists():
            # all the fitting models: exactly the datamodel_weights asset's fit (same models, split and
            # settings), so its stored weights are used instead of fitting the whole path again
            w = np.asarray(store.load_npy(exp, DM, "weight.npy"), np.float64)
            b = np.asarray(store.load_npy(exp, DM, "bias.npy"), np.float64)
        else:
            res = _fit(spec, masks, margins, fit[:m], val, lambda _: None, f"datamodels ({m} models)")
            w, b = res.weight, res.bias
        value, low, high, _ = lds_bootstrap(x @ w + b, actual, n_boot=spec.lds.bootstrap, seed=spec.seed)
        rows.append({"experiment": exp, "method": "datamodels", "num_models": m, "lds": value, "ci95_low": low,
                     "ci95_high": high})
    table = pl.DataFrame(rows)
    for r in rows:
        log(f"LDS {r['method']} with {r['num_models']} models: {r['lds']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]")
    return table


def plot_lds_curve(curve: pl.DataFrame, dest) -> "Path":
    """LDS (with its bootstrap interval) against the number of models, one line per method, as PNG."""
    from ops.plots import figure, save

    fig, ax = figure()
    for (method,), g in curve.group_by("method", maintain_order=True):
        g = g.sort("num_models")
        ax.plot(g["num_models"].to_numpy(), g["lds"].to_numpy(), marker="o", label=method)
        ax.fill_between(g["num_models"].to_numpy(), g["ci95_low"].to_numpy(), g["ci95_high"].to_numpy(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("models")
    ax.set_ylabel("LDS")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, dest)
