"""Spectral signatures (Tran, Li & Madry 2018): the baseline detector.

Within each class, centre the learned representations and score each example by its squared
projection on the top right singular vector; poisons share a direction and score high.  Scores
are divided by the class's mean score so that classes are comparable in one ranking.
"""
from __future__ import annotations

import numpy as np


def spectral_scores(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    feats = np.asarray(features, np.float64)
    out = np.zeros(len(feats))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        r = feats[idx] - feats[idx].mean(0)
        _, _, vt = np.linalg.svd(r, full_matrices=False)
        s = (r @ vt[0]) ** 2
        out[idx] = s / (s.mean() + 1e-12)
    return out


def spectral_scores_reference(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Same score through the covariance eigenvector, one example at a time."""
    feats = np.asarray(features, np.float64)
    out = np.zeros(len(feats))
    for c in np.unique(labels):
        idx = [i for i in range(len(feats)) if labels[i] == c]
        if len(idx) < 2:
            continue
        mu = feats[idx].mean(0)
        cov = sum(np.outer(feats[i] - mu, feats[i] - mu) for i in idx)
        v = np.linalg.eigh(cov)[1][:, -1]
        s = np.array([float((feats[i] - mu) @ v) ** 2 for i in idx])
        out[idx] = s / (s.mean() + 1e-12)
    return out
