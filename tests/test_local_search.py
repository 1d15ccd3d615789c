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


def _auroc(scores, truth):
    from sklearn.metrics import roc_auc_score
    return roc_auc_score(truth, scores)


def test_q_free_recovers_the_symmetric_kernel_where_q_is_zero():
    from kernels.local_search import q_free
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8))
    kern = x @ x.T
    q = rng.uniform(0.01, 1, 30)
    q[[3, 17]] = 0.0                                   # fitted to float precision: their columns vanish
    tau = kern * q[None, :]
    out = q_free(tau, q)
    known = ~np.eye(30, dtype=bool)
    known[3, 17] = known[17, 3] = False                # both columns lost: nothing to recover
    np.testing.assert_allclose(out[known], kern[known], rtol=2e-6)
    assert out.dtype == np.float32                     # n x n: stored in float32, never float64
    assert (np.diag(out) == 0).all() and out[3, 17] == out[17, 3] == 0
    with pytest.raises(ValueError, match="n x n"):
        q_free(tau[:, :4], q)


def test_centring_at_references_is_the_kernel_of_centred_features():
    """With R and B from reference means, the centred kernel equals (ψ_i − μ_yi)·(ψ_j − μ_yj) off the
    diagonal, and the vectorized version equals the plain loops."""
    from kernels.local_search import center_at_references, center_at_references_reference
    rng = np.random.default_rng(4)
    n, d = 40, 6
    labels = rng.choice(np.array([3, 7, 9]), n)
    psi = rng.standard_normal((n, d))
    mu = rng.standard_normal((3, d))                   # one reference mean per label, in np.unique order
    y = np.searchsorted([3, 7, 9], labels)
    expect = (psi - mu[y]) @ (psi - mu[y]).T
    np.fill_diagonal(expect, 0.0)
    for rows in (1024, 7):                              # one block, and blocks that do not divide n
        got = center_at_references(psi @ psi.T, labels, psi @ mu.T, mu @ mu.T, rows=rows)
        np.testing.assert_allclose(got, expect, atol=1e-10)
    np.testing.assert_allclose(center_at_references_reference(psi @ psi.T, labels, psi @ mu.T, mu @ mu.T),
                               expect, atol=1e-10)
    with pytest.raises(ValueError, match="label effects"):
        center_at_references(psi @ psi.T, labels, psi @ mu[:2].T, mu @ mu.T)


def test_same_label_support_fast_matches_reference():
    from kernels.local_search import same_label_support, same_label_support_reference
    rng = np.random.default_rng(5)
    n = 60
    b = rng.standard_normal((n, n))
    labels = rng.integers(0, 4, n)
    w = rng.uniform(0, 1, n)
    np.testing.assert_allclose(same_label_support(b, w, labels), same_label_support_reference(b, w, labels),
                               atol=1e-12)


def _half_label_poisoned(seed=0, n=600, d=40):
    """Features of 6 labels; half of label 0 carries an extra shared direction (the trigger), like a
    clean-label attack on half the target class or BadNets at 10% of a 10-class set.  Returns the
    features, the labels, the truth and reference means drawn like the clean examples (a test split)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 6
    means = rng.standard_normal((6, d)) * 2
    x = means[labels] + rng.standard_normal((n, d))
    truth = (labels == 0) & (rng.uniform(size=n) < 0.5)
    x[truth, 0] += 2.5
    test_labels = np.arange(300) % 6
    test = means[test_labels] + rng.standard_normal((300, d))
    mu = np.stack([test[test_labels == c].mean(0) for c in range(6)])
    return x, labels, truth, mu


def test_test_centring_breaks_the_mirror_of_a_half_poisoned_label():
    """When poisons are half their label, centring at the label's own mean makes the two halves mirror
    images (the search may take either); centring at clean reference means of the label does not."""
    from kernels.local_search import center_at_references, double_center_label_blocks
    aucs = {"test": [], "double": []}
    for seed in range(3):
        x, labels, truth, mu = _half_label_poisoned(seed)
        gram = x @ x.T
        tc = center_at_references(gram.copy(), labels, x @ mu.T, mu @ mu.T)
        dc = double_center_label_blocks(gram.copy(), labels)
        for key, a in (("test", tc), ("double", dc)):
            s = strongest_feature_scores(a, sizes=[20, 40, 80], restarts=8, seed=seed, score="support", labels=labels)
            aucs[key].append(_auroc(s, truth))
    assert min(aucs["test"]) > 0.95
    assert np.mean(aucs["double"]) < np.mean(aucs["test"]) - 0.1


def test_support_score_keeps_groups_that_oppose_each_other():
    """All-to-all poisoning: two planted groups in two labels that suppress each other (negative
    cross block).  Membership splits the restarts between the groups; the within-label support
    ranks both above the clean examples, and the global sum would let one cancel the other."""
    rng = np.random.default_rng(3)
    n = 400
    labels = np.arange(n) % 4
    a = rng.standard_normal((n, n)) * 0.5
    a = (a + a.T) / 2
    g1 = np.flatnonzero(labels == 1)[:25]
    g2 = np.flatnonzero(labels == 2)[:25]
    a[np.ix_(g1, g1)] += 1.2
    a[np.ix_(g2, g2)] += 1.0
    a[np.ix_(g1, g2)] -= 1.5
    a[np.ix_(g2, g1)] -= 1.5
    truth = np.zeros(n, bool)
    truth[g1] = truth[g2] = True
    s = strongest_feature_scores(a, sizes=[10, 20], restarts=12, seed=0, score="support", labels=labels)
    assert _auroc(s, truth) > 0.99
    assert auto_flag(s)[truth].mean() > 0.9
    with pytest.raises(ValueError, match="one label per example"):
        strongest_feature_scores(a, sizes=[10], restarts=2, score="support")
    with pytest.raises(ValueError, match="unknown score"):
        strongest_feature_scores(a, sizes=[10], restarts=2, score="loudest")


def _planted_all_to_all(seed=4, n=600, strengths=(2.0, 1.0, 0.6)):
    """Three labels, each with its own planted group of 20 at a different strength."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    a = rng.standard_normal((n, n)) * 0.5
    a = (a + a.T) / 2
    truth = np.zeros(n, bool)
    for c, w in enumerate(strengths):
        g = np.flatnonzero(labels == c)[:20]
        a[np.ix_(g, g)] += w
        truth[g] = True
    np.fill_diagonal(a, 0)
    return a, labels, truth


def test_per_label_search_finds_every_labels_group_where_the_global_search_finds_the_strongest():
    from kernels.local_search import strongest_feature_membership

    a, labels, truth = _planted_all_to_all()
    weak = truth & (labels == 2)
    glob = strongest_feature_membership(a, sizes=[10, 20], restarts=16, seed=0)
    per = strongest_feature_membership(a, sizes=[10, 20], restarts=16, seed=0, search="per_label", labels=labels)
    both = strongest_feature_membership(a, sizes=[10, 20], restarts=16, seed=0, search="both", labels=labels)
    assert glob[weak].sum() < 0.05 * glob.sum()          # the global search spends itself on the strong group
    for c in range(3):                                    # every label's group holds most of its label's mass
        g = truth & (labels == c)
        assert per[g].sum() > 0.6 * per[labels == c].sum()
    assert np.isclose(per.sum(), 1) and np.isclose(both.sum(), 2)
    parts = strongest_feature_membership(a, sizes=[10, 20], restarts=16, seed=0, search="both", labels=labels,
                                         parts=True)
    np.testing.assert_allclose(parts["per_label"], per)       # the per-label search runs first, same draws
    np.testing.assert_allclose(parts["per_label"] + parts["global"], both)
    assert _auroc(both, truth) > 0.95
    with pytest.raises(ValueError, match="needs one label per example"):
        strongest_feature_membership(a, sizes=[10], restarts=2, search="per_label")
    with pytest.raises(ValueError, match="unknown search"):
        strongest_feature_membership(a, sizes=[10], restarts=2, search="sideways", labels=labels)


def test_global_membership_is_the_papers_aggregation_unchanged():
    """search='global' reproduces the search loop written out: same seeds, same solutions."""
    from kernels.local_search import strongest_feature_membership

    a, _, _ = _planted_all_to_all(seed=1, n=120)
    b, r = prepare(a)
    rng = np.random.default_rng(7)
    want = np.zeros(len(a))
    for k in (10, 20):
        sols = search_reference(b, -(k / len(a)) * r, initial_sets(len(a), k, 6, rng), 100, 100)
        want += sols.mean(0) * k ** -0.5
    got = strongest_feature_membership(a, sizes=[10, 20], restarts=6, seed=7)
    np.testing.assert_allclose(got, want)


def test_null_support_gives_an_example_the_score_it_would_get_inside_the_matrix():
    """A test example identical (in the kernel) to a training example gets that example's support."""
    from kernels.local_search import null_support, same_label_support

    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 5))
    labels = np.arange(30) % 3
    a = x @ x.T
    np.fill_diagonal(a, 0)
    w = rng.random(30)
    w[4] = 0.0                                            # the example itself carries no weight
    rows = (x[[4]] @ x.T)
    rows[0, 4] = 0.0
    b, _ = prepare(a)
    got = null_support(rows, labels[[4]], w, labels)
    np.testing.assert_allclose(got, same_label_support(b, w, labels)[[4]])
    ref = [2 * sum(rows[0, j] * w[j] for j in range(30) if labels[j] == labels[4])]
    np.testing.assert_allclose(got, ref)
    with pytest.raises(ValueError, match="null rows must be 1 x 30"):
        null_support(rows[:, :5], labels[[4]], w, labels)
