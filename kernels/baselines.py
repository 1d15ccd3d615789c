"""Baseline poison detectors on learned representations (the ones a user would otherwise try).

Each takes the penultimate features of a model trained on the (poisoned) training set and the
training labels, and returns a per-example score (higher = more suspicious); none is told the
poison rate.

- ``activation_clustering`` (Chen et al. 2019): per class, the centred features reduced to 10
  dimensions (PCA), split in two by k-means; the smaller cluster is the suspect one.  Score:
  how much closer an example lies to the smaller cluster's centre than to the larger one's,
  scaled by the class's silhouette (how clearly the class splits in two), so that a class that
  does not split scores near zero.  ``ac_flags`` applies the paper's rule: the smaller cluster
  of a class is flagged when it holds at most 35% of the class and its silhouette is at least
  0.15.
- ``spectre_scores`` (Hayase et al. 2021, "SPECTRE"): per class, features projected to their top
  principal directions, whitened with a robust covariance estimate (scikit-learn's minimum
  covariance determinant) so that the poisons cannot hide in the estimate, then scored by QUantum
  Entropy (QUE): τ_i = x̃_iᵀ Q x̃_i / tr Q with Q = exp(α (Σ̃ − I) / (‖Σ̃‖₂ − 1)), α = 4.  Scores
  are divided by the class median so classes are comparable.

Spectral signatures live in kernels/spectral.py.  ``*_reference`` versions compute the same
scores the plain way (loops, explicit eigendecompositions) for the tests.
"""
from __future__ import annotations

import numpy as np


def _classes(labels):
    labels = np.asarray(labels)
    return [(c, np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _pca(x: np.ndarray, dims: int) -> np.ndarray:
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:dims].T


def _two_means(z: np.ndarray, seed: int):
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
    lab = km.labels_
    counts = np.bincount(lab, minlength=2)
    small = int(np.argmin(counts))
    sil = float(silhouette_score(z, lab, sample_size=min(len(z), 2000), random_state=seed)) \
        if 0 < counts.min() and len(z) > 2 else 0.0
    return lab, small, km.cluster_centers_, counts, sil


def activation_clustering(features: np.ndarray, labels: np.ndarray, dims: int = 10, seed: int = 0):
    """(scores, flags) per training example (see the module docstring)."""
    feats = np.asarray(features, np.float64)
    scores = np.zeros(len(feats))
    flags = np.zeros(len(feats), bool)
    for _, idx in _classes(labels):
        if len(idx) < 4:
            continue
        z = _pca(feats[idx], min(dims, len(idx) - 1, feats.shape[1]))
        lab, small, centres, counts, sil = _two_means(z, seed)
        d_small = np.linalg.norm(z - centres[small], axis=1)
        d_big = np.linalg.norm(z - centres[1 - small], axis=1)
        closer = (d_big - d_small) / (d_big + d_small + 1e-12)      # in [-1, 1]
        scores[idx] = max(sil, 0.0) * closer
        if counts[small] <= 0.35 * len(idx) and sil >= 0.15:
            flags[idx[lab == small]] = True
    return scores, flags


def _robust_whitener(z: np.ndarray, seed: int):
    import warnings

    from sklearn.covariance import MinCovDet

    with warnings.catch_warnings():   # MinCovDet's C-step warns on tiny determinant increases (rounding)
        warnings.simplefilter("ignore", RuntimeWarning)
        mcd = MinCovDet(random_state=seed).fit(z)
    # the raw MCD estimate: the reweighted one lets back in points within the 97.5% chi-square
    # quantile, poisons among them, and inflates the very direction they lie along
    w, v = np.linalg.eigh(mcd.raw_covariance_)
    w = np.maximum(w, 1e-12 * max(w.max(), 1e-300))
    return mcd.raw_location_, v / np.sqrt(w)


def que_scores(x: np.ndarray, alpha: float = 4.0) -> np.ndarray:
    """QUantum Entropy outlier scores of whitened points x (n x d)."""
    sigma = (x.T @ x) / len(x)
    w, v = np.linalg.eigh(sigma)
    top = w.max()
    if top <= 1.0 + 1e-9:          # nothing stands out: Q is the identity, scores = squared norms / d
        q = np.eye(x.shape[1])
    else:
        q = (v * np.exp(alpha * (w - 1.0) / (top - 1.0))) @ v.T
    return np.einsum("ij,jk,ik->i", x, q, x) / np.trace(q)


def spectre_scores(features: np.ndarray, labels: np.ndarray, dims: int = 32, alpha: float = 4.0,
                   seed: int = 0) -> np.ndarray:
    feats = np.asarray(features, np.float64)
    scores = np.zeros(len(feats))
    for _, idx in _classes(labels):
        k = min(dims, len(idx) // 4, feats.shape[1])
        if k < 1:
            continue
        z = _pca(feats[idx], k)
        mu, wh = _robust_whitener(z, seed)
        s = que_scores((z - mu) @ wh, alpha)
        scores[idx] = s / (np.median(s) + 1e-12)
    return scores


def que_scores_reference(x: np.ndarray, alpha: float = 4.0) -> np.ndarray:
    """QUE through scipy's matrix exponential, one example at a time."""
    from scipy.linalg import expm

    sigma = sum(np.outer(r, r) for r in x) / len(x)
    top = np.linalg.eigvalsh(sigma).max()
    q = np.eye(x.shape[1]) if top <= 1.0 + 1e-9 else expm(alpha * (sigma - np.eye(x.shape[1])) / (top - 1.0))
    return np.array([r @ q @ r for r in x]) / np.trace(q)
