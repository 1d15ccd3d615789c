"""LASSO for datamodels: every target is one column, all solved together.

Objective per target t (the scikit-learn scaling, so its ``Lasso`` is our plain reference):

    min_w  1/(2m) ||X_std w - (y_t - mean(y_t))||^2 + lam_t ||w||_1

with X_std the masks standardized column-wise.  The fast solver is FISTA on the whole
weight matrix W (n x T) at once (one matmul per iteration for all targets, each with its own
lam_t), warm-started along a geometric regularization path (shared/reference/datamodels.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    std = x.std(0)
    std[std == 0] = 1.0
    return (x - mean) / std, mean, std


def _lipschitz(x: np.ndarray, iters: int = 50) -> float:
    v = np.random.default_rng(0).standard_normal(x.shape[1])
    for _ in range(iters):
        v = x.T @ (x @ v)
        v /= np.linalg.norm(v) + 1e-300
    return float(np.linalg.norm(x @ v) ** 2 / x.shape[0]) * 1.01 + 1e-12


def lasso_fista(xs: np.ndarray, yc: np.ndarray, lam: np.ndarray, w0: np.ndarray | None = None,
                max_iter: int = 2000, tol: float = 1e-7, lipschitz: float | None = None) -> np.ndarray:
    """FISTA with adaptive restart for all columns of ``yc`` (centered) at per-column ``lam``."""
    m, n = xs.shape
    dt = xs.dtype
    yc = np.asarray(yc, dt)
    lam = np.broadcast_to(np.asarray(lam, dt), (yc.shape[1],))
    L = lipschitz or _lipschitz(xs)
    step = dt.type(1.0 / L)
    w = np.zeros((n, yc.shape[1]), dt) if w0 is None else w0.astype(dt)
    z, t = w.copy(), 1.0
    xty = xs.T @ yc / dt.type(m)
    thresh = lam * step
    for it in range(max_iter):
        g = xs.T @ (xs @ z) / dt.type(m) - xty
        u = z - step * g
        w_new = np.sign(u) * np.maximum(np.abs(u) - thresh, 0)
        delta = w_new - w
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        # adaptive restart (O'Donoghue & Candes) when momentum points uphill
        if np.sum((z - w_new) * delta) > 0:
            t_new, z = 1.0, w_new
        else:
            z = w_new + dt.type((t - 1) / t_new) * delta
        w, t = w_new, t_new
        if it % 10 == 9 and np.max(np.abs(delta)) < tol * max(1.0, float(np.max(np.abs(w)))):
            break
    return w


def lasso_reference(xs: np.ndarray, yc: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """scikit-learn coordinate descent, one target at a time, same objective."""
    from sklearn.linear_model import Lasso

    out = np.zeros((xs.shape[1], yc.shape[1]))
    for t in range(yc.shape[1]):
        out[:, t] = Lasso(alpha=float(lam[t]), fit_intercept=False, tol=1e-10,
                          max_iter=100_000).fit(xs, yc[:, t]).coef_
    return out


def objective(xs, yc, w, lam) -> np.ndarray:
    r = xs @ w - yc
    return 0.5 * (r * r).sum(0) / xs.shape[0] + np.asarray(lam) * np.abs(w).sum(0)


@dataclass
class DatamodelFit:
    weight: np.ndarray      # n x T, in the units of the raw 0/1 mask
    bias: np.ndarray        # T
    lam: np.ndarray         # T, chosen by validation
    val_mse: np.ndarray     # K x T, validation MSE along the path
    lambdas: np.ndarray     # K x T


def fit_datamodels(masks_fit: np.ndarray, y_fit: np.ndarray, masks_val: np.ndarray, y_val: np.ndarray,
                   n_lambdas: int = 20, eps: float = 1e-2, max_iter: int = 500, tol: float = 1e-5,
                   on_step=None) -> DatamodelFit:
    """Regularization path on the fit models, lam per target by validation MSE, refit on both.

    The path runs in float32 (half the memory traffic; the tolerance suits it); metrics in float64.
    """
    y_fit, y_val = np.asarray(y_fit, np.float64), np.asarray(y_val, np.float64)
    xs, mean, std = standardize(masks_fit)
    xs = xs.astype(np.float32)
    ybar = y_fit.mean(0)
    yc = y_fit - ybar
    m = len(xs)
    lam_max = np.abs(xs.T @ yc).max(0) / m + 1e-12
    factors = np.geomspace(1.0, eps, n_lambdas)
    xv = (np.asarray(masks_val, np.float64) - mean) / std
    L = _lipschitz(xs)
    w = np.zeros((xs.shape[1], y_fit.shape[1]), np.float32)
    val_mse = np.zeros((n_lambdas, y_fit.shape[1]))
    best_w = w.copy()
    for i, f in enumerate(factors):
        w = lasso_fista(xs, yc, lam_max * f, w0=w, max_iter=max_iter, lipschitz=L, tol=tol)
        pred = xv @ w + ybar
        val_mse[i] = ((pred - y_val) ** 2).mean(0)
        better = val_mse[i] < val_mse[:i].min(0) if i else np.ones(w.shape[1], bool)
        best_w[:, better] = w[:, better]
        if on_step:
            on_step(i, n_lambdas)
    best = val_mse.argmin(0)
    lam = lam_max * factors[best]
    # refit on fit + validation models at the chosen lam
    x_all = np.concatenate([masks_fit, masks_val])
    y_all = np.concatenate([y_fit, y_val])
    xa, mean_a, std_a = standardize(x_all)
    ybar_a = y_all.mean(0)
    w_a = lasso_fista(xa.astype(np.float32), y_all - ybar_a, lam, w0=best_w, max_iter=max_iter * 2, tol=tol)
    weight = w_a.astype(np.float64) / std_a[:, None]
    bias = ybar_a - mean_a @ weight
    return DatamodelFit(weight=weight.astype(np.float32), bias=bias.astype(np.float32), lam=lam,
                        val_mse=val_mse, lambdas=np.outer(factors, lam_max))
