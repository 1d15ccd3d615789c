"""Linear datamodeling score and detection metrics."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho between a[:, t] and b[:, t] for every column t, vectorized (ties averaged)."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(0) / den
    return np.where(den > 0, rho, np.nan)


def spearman_columns_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([spearmanr(a[:, t], b[:, t]).statistic for t in range(a.shape[1])])


def lds(pred: np.ndarray, actual: np.ndarray) -> tuple[float, float, np.ndarray]:
    """LDS = mean over targets of Spearman(prediction, actual margin) across held-out models.

    pred, actual: (held-out models x targets).  Returns (mean, 95% half-width, per-target rho).
    Targets whose prediction is constant across models (rho undefined) count as 0.
    """
    rho = np.nan_to_num(spearman_columns(pred, actual), nan=0.0)
    half = 1.96 * rho.std(ddof=1) / np.sqrt(len(rho)) if len(rho) > 1 else float("nan")
    return float(rho.mean()), float(half), rho


class _SortedColumns:
    """Each column's sort order and tie groups, computed once, so that the average ranks of a
    bootstrap draw come from the draw's multiplicities alone: a row drawn c times and the rows tied
    with it form one tie group of the drawn sample, whose average rank is (copies of smaller values)
    + (copies in the group + 1) / 2.  Replaces a rankdata of the resampled (rows x columns) array
    per replicate (31 s of the demo's LDS stage went there)."""

    def __init__(self, x: np.ndarray):
        h, t = x.shape
        self.order = np.argsort(x, axis=0, kind="stable")
        v = np.take_along_axis(x, self.order, 0)
        start = np.ones((h, t), bool)
        start[1:] = v[1:] != v[:-1]
        pos = np.arange(h)[:, None].repeat(t, 1)
        self.first = np.maximum.accumulate(np.where(start, pos, 0), axis=0)            # group's first position
        end = np.ones((h, t), bool)
        end[:-1] = start[1:]
        self.last = np.minimum.accumulate(np.where(end, pos, h - 1)[::-1], axis=0)[::-1]   # group's last
        self.cols = np.arange(t)[None, :]

    def ranks(self, c: np.ndarray) -> np.ndarray:
        """Average ranks (rows x columns) of each original row within the draw with multiplicities ``c``."""
        cs = c[self.order]
        cum = np.cumsum(cs, axis=0)
        below = cum[self.first, self.cols] - cs[self.first, self.cols]
        upto = cum[self.last, self.cols]
        r = np.empty_like(cum)
        np.put_along_axis(r, self.order, below + (upto - below + 1) / 2, 0)
        return r


def _weighted_pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``a`` and ``b`` with row weights ``w`` (a bootstrap
    draw's multiplicities: the same as the plain correlation over the drawn copies); 0 where either
    side is constant over the rows drawn."""
    w = w[:, None] / w.sum()
    a = a - (w * a).sum(0)
    b = b - (w * b).sum(0)
    va, vb = (w * a * a).sum(0), (w * b * b).sum(0)
    den = np.sqrt(va * vb)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (w * a * b).sum(0) / den
    return np.where(den > 1e-12 * np.maximum(va + vb, 1e-300), rho, 0.0)


def lds_bootstrap(pred: np.ndarray, actual: np.ndarray, n_boot: int = 500, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float, float, np.ndarray]:
    """LDS with a bootstrap interval over held-out models *and* targets.

    Each replicate draws the held-out models (rows) and the targets (columns) with replacement and
    takes the mean over the drawn targets of the Spearman rho across the drawn models, so the
    interval carries both sources of variance (a normal interval over targets alone leaves out the
    models').  The percentiles are shifted by the replicates' mean bias (duplicated models tie
    ranks and pull ρ down).  Returns (LDS on all data, low, high, per-target rho); a target whose
    prediction or margin is constant over the drawn models counts 0, as in ``lds``.
    """
    pred, actual = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    value, _, rho = lds(pred, actual)
    h, t = actual.shape
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    sp, sa = _SortedColumns(pred), _SortedColumns(actual)
    for b in range(n_boot):
        im = rng.integers(0, h, h)
        it = rng.integers(0, t, t)
        c = np.bincount(im, minlength=h).astype(np.float64)
        r = _weighted_pearson(sp.ranks(c), sa.ranks(c), c)
        reps[b] = r[it].mean()
    # drawing models with replacement ties their ranks and pulls every replicate's ρ down (on
    # Fashion-MNIST by ~0.015, the estimate sat at the top of the plain percentile interval): shift
    # the percentiles by the replicates' bias, mean(reps) - value
    bias = reps.mean() - value
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) - bias
    return value, float(lo), float(hi), rho


def lds_bootstrap_reference(pred, actual, n_boot: int = 500, seed: int = 0, level: float = 0.95):
    """Same replicates, one scipy Spearman per drawn target."""
    h, t = actual.shape
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        im = rng.integers(0, h, h)
        it = rng.integers(0, t, t)
        vals = []
        for j in it:
            a, b = pred[im, j], actual[im, j]
            vals.append(0.0 if a.std() == 0 or b.std() == 0 else spearmanr(a, b).statistic)
        reps.append(np.mean(vals))
    value = np.mean([0.0 if pred[:, j].std() == 0 or actual[:, j].std() == 0
                     else spearmanr(pred[:, j], actual[:, j]).statistic for j in range(t)])
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) - (np.mean(reps) - value)
    return float(lo), float(hi)


def recall_at_fpr(scores: np.ndarray, truth: np.ndarray, fpr: float = 0.01) -> float:
    """Share of the poisoned examples scored strictly above the clean examples' (1 - fpr) quantile:
    the recall of a threshold that flags at most ``fpr`` of the clean examples (ties count against)."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    clean = np.sort(scores[~truth])[::-1]
    allowed = int(np.floor(fpr * len(clean)))        # clean examples allowed above the threshold
    thr = clean[allowed] if allowed < len(clean) else -np.inf
    return float((scores[truth] > thr).mean())


def detection_metrics(scores: np.ndarray, flagged: np.ndarray, truth: np.ndarray) -> dict:
    """Precision/recall of the flagged set, recall within the top |poisoned|, recall at 1% FPR, AUROC."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, bool)
    flagged = np.asarray(flagged, bool)
    p = int(truth.sum())
    tp = int((flagged & truth).sum())
    top = np.argsort(-scores, kind="stable")[:p]
    both = 0 < p < len(truth)
    return {
        "n_poisoned": p,
        "n_flagged": int(flagged.sum()),
        "precision": tp / int(flagged.sum()) if flagged.any() else float("nan"),
        "recall": tp / p if p else float("nan"),
        "recall_at_budget": float(truth[top].mean()) if p else float("nan"),
        "recall_at_fpr01": recall_at_fpr(scores, truth, 0.01) if both else float("nan"),
        "auroc": float(roc_auc_score(truth, scores)) if both else float("nan"),
    }
