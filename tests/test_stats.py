import numpy as np
import pytest

from kernels.spectral import spectral_scores, spectral_scores_reference
from kernels.stats import detection_metrics, lds, spearman_columns, spearman_columns_reference


def test_vectorized_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 7))
    b = a + rng.standard_normal((30, 7))
    b[:5, 2] = b[0, 2]  # ties
    np.testing.assert_allclose(spearman_columns(a, b), spearman_columns_reference(a, b), rtol=1e-10)


def test_lds_of_perfect_and_random_predictions():
    rng = np.random.default_rng(0)
    actual = rng.standard_normal((50, 20))
    assert lds(actual * 3 + 1, actual)[0] == 1.0
    assert abs(lds(rng.standard_normal((50, 20)), actual)[0]) < 0.1
    # a constant prediction has no rank information and counts as 0
    assert lds(np.ones((50, 20)), actual)[0] == 0.0


def test_detection_metrics():
    truth = np.array([1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.2, 0.8, 0.1, 0.0, 0.3])
    flagged = np.array([1, 0, 1, 0, 0, 0], bool)
    m = detection_metrics(scores, flagged, truth)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["recall_at_budget"] == 0.5
    assert m["auroc"] == 0.75


def test_spectral_signature_fast_equals_reference_and_finds_outlier_direction():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((120, 6))
    labels = np.repeat([0, 1], 60)
    feats[:8, 0] += 10.0  # a poisoned cluster inside class 0
    fast = spectral_scores(feats, labels)
    np.testing.assert_allclose(fast, spectral_scores_reference(feats, labels), rtol=1e-8)
    assert set(np.argsort(-fast[:60])[:8]) == set(range(8))   # top of class 0


def test_lds_bootstrap_matches_the_written_out_replicates_and_counts_model_variance():
    from kernels.stats import lds, lds_bootstrap, lds_bootstrap_reference

    rng = np.random.default_rng(3)
    actual = rng.standard_normal((12, 9))
    pred = actual + rng.standard_normal((12, 9)) * 1.5
    value, lo, hi, rho = lds_bootstrap(pred, actual, n_boot=60, seed=4)
    assert value == pytest.approx(lds(pred, actual)[0]) and lo <= value <= hi
    ref_lo, ref_hi = lds_bootstrap_reference(pred, actual, n_boot=60, seed=4)
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))
    # with few held-out models the interval over models and targets is wider than the normal
    # interval over targets alone (which treats the models as fixed)
    _, half, _ = lds(pred, actual)
    assert hi - lo > 2 * half


def test_lds_bootstrap_ranks_from_multiplicities_handle_ties_and_constant_columns():
    """The replicates' ranks come from each draw's multiplicities over a sort done once; with tied
    values (rounded predictions), a constant prediction and a constant margin they must still be
    scipy's average ranks, replicate for replicate."""
    from kernels.stats import _SortedColumns, _weighted_pearson, lds_bootstrap, lds_bootstrap_reference
    from scipy.stats import rankdata

    rng = np.random.default_rng(7)
    actual = np.round(rng.standard_normal((15, 7)), 1)
    pred = np.round(actual + rng.standard_normal((15, 7)), 0)       # many ties
    pred[:, 3] = 2.0                                                  # constant prediction
    actual[:, 5] = -1.0                                               # constant margin
    for seed in range(5):
        im = np.random.default_rng(seed).integers(0, 15, 15)
        c = np.bincount(im, minlength=15).astype(float)
        for x in (pred, actual):
            ranks = _SortedColumns(x).ranks(c)
            np.testing.assert_allclose(ranks[im], rankdata(x[im], axis=0))
        r = _weighted_pearson(_SortedColumns(pred).ranks(c), _SortedColumns(actual).ranks(c), c)
        assert r[3] == 0 and r[5] == 0
    _, lo, hi, _ = lds_bootstrap(pred, actual, n_boot=40, seed=2)
    assert (lo, hi) == pytest.approx(lds_bootstrap_reference(pred, actual, n_boot=40, seed=2))
