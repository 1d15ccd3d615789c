import numpy as np
import pytest

from kernels.local_search import (auto_flag, default_sizes, initial_sets, objective, prepare, search_fast,
                                  search_reference, strongest_feature_scores)


def _planted(n=300, p=20, delta=1.5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    planted = rng.choice(n, p, replace=False)
    a[np.ix_(planted, planted)] += delta
    truth = np.zeros(n, bool)
    truth[planted] = True
    return a, truth


def test_fast_and_reference_search_agree():
    a, _ = _planted(120, 10)
    b, r = prepare(a)
    init = initial_sets(120, 15, 6, np.random.default_rng(3))
    d = -(15 / 120) * r
    fast = search_fast(b, d, init, 30, 20)
    ref = search_reference(b, d, init, 30, 20)
    np.testing.assert_array_equal(fast, ref)
    assert (fast.sum(1) == 15).all()
    # the search never ends worse than it started
    for s0, s in zip(init, fast):
        assert objective(b, d, s) >= objective(b, d, s0) - 1e-9


def test_objective_is_within_set_influence_minus_random_baseline():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 10))
    sel = np.zeros(10, bool)
    sel[[1, 4, 6]] = True
    b, r = prepare(a)
    d = -(3 / 10) * r
    a0 = a.copy()
    np.fill_diagonal(a0, 0)
    idx = [1, 4, 6]
    expect = a0[np.ix_(idx, idx)].sum() - 0.3 * a0[idx].sum()
    assert objective(b, d, sel) == pytest.approx(expect)


def test_planted_set_ranks_first():
    a, truth = _planted()
    s = strongest_feature_scores(a, restarts=8, seed=0)
    top = np.argsort(-s)[: truth.sum()]
    assert truth[top].mean() >= 0.9
    flags = auto_flag(s)
    assert flags.sum() >= truth.sum() * 0.8 and truth[flags].mean() >= 0.8


def test_seeded_and_rejects_bad_input():
    a, _ = _planted(100, 10)
    np.testing.assert_array_equal(strongest_feature_scores(a, restarts=3, seed=5),
                                  strongest_feature_scores(a, restarts=3, seed=5))
    a[3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        strongest_feature_scores(a)
    with pytest.raises(ValueError, match="square"):
        strongest_feature_scores(np.zeros((3, 4)))


def test_sizes_adapt_to_n_and_noise_flags_nothing():
    assert default_sizes(1000) == [10, 20, 40, 80, 160, 320]
    assert default_sizes(30) == [10]
    assert default_sizes(8) == [2]
    rng = np.random.default_rng(1)
    assert auto_flag(rng.standard_normal(500)).sum() == 0
