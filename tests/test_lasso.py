import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels.lasso import fit_datamodels, lasso_cd, lasso_reference, objective, standardize


def _problem(m, n, t, seed, rate=0.5):
    rng = np.random.default_rng(seed)
    x = (rng.random((m, n)) < rate).astype(float)
    w_true = np.zeros((n, t))
    for c in range(t):
        w_true[rng.choice(n, size=min(n, 3), replace=False), c] = rng.normal(0, 1, min(n, 3))
    y = x @ w_true + 0.1 * rng.standard_normal((m, t))
    xs, _, _ = standardize(x)
    return xs, y - y.mean(0)


@pytest.mark.parametrize("m,n", [(80, 30), (20, 500)])   # more models than examples, and far fewer
def test_coordinate_descent_matches_sklearn(m, n):
    xs, yc = _problem(m, n, 4, seed=m)
    lam_max = np.abs(xs.T @ yc).max(0) / m
    lam = lam_max * np.array([0.5, 0.1, 0.03, 0.01])
    fast, gap, _ = lasso_cd(xs, yc, lam, tol=1e-10)
    ref = lasso_reference(xs, yc, lam)
    assert np.all(gap <= 1e-10)
    np.testing.assert_allclose(objective(xs, yc, fast, lam), objective(xs, yc, ref, lam), rtol=1e-7)
    if m > n:   # unique solution: the weights agree too
        np.testing.assert_allclose(fast, ref, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(5, 40), n=st.integers(1, 120), seed=st.integers(0, 2**16), frac=st.floats(0.005, 1.2),
       rate=st.floats(0.05, 0.95))
def test_duality_gap_certifies_the_objective(m, n, seed, frac, rate):
    """Whatever the shapes: a target reported converged is within tol of scikit-learn's optimum."""
    xs, yc = _problem(m, n, 2, seed, rate)
    lam_max = np.abs(xs.T @ yc).max(0) / m + 1e-12
    lam = lam_max * frac
    fast, gap, _ = lasso_cd(xs, yc, lam, tol=1e-8)
    ref = lasso_reference(xs, yc, lam)
    ours, theirs = objective(xs, yc, fast, lam), objective(xs, yc, ref, lam)
    assert np.all(gap <= 1e-8)
    assert np.all(ours <= theirs * (1 + 1e-7) + 1e-15)
    if frac >= 1:    # lam at or above lam_max: the zero vector is the optimum
        assert np.all(fast == 0)


def test_warm_start_and_bad_lam():
    xs, yc = _problem(30, 200, 3, seed=5)
    lam = np.abs(xs.T @ yc).max(0) / 30 * 0.05
    cold, _, sweeps_cold = lasso_cd(xs, yc, lam, tol=1e-9)
    warm, gap, sweeps_warm = lasso_cd(xs, yc, lam, w0=cold, tol=1e-9)
    assert np.all(gap <= 1e-9) and np.all(sweeps_warm < sweeps_cold)
    np.testing.assert_allclose(objective(xs, yc, warm, lam), objective(xs, yc, cold, lam), rtol=1e-8)
    with pytest.raises(ValueError, match="lam"):
        lasso_cd(xs, yc, np.zeros(3))


@pytest.mark.parametrize("m,n", [(60, 300), (240, 60)])     # coordinate descent, Gram coordinate descent
def test_blocks_give_the_same_fit_as_one_block(m, n):
    rng = np.random.default_rng(3)
    masks = rng.random((m, n)) < 0.5
    w = np.zeros((n, 9))
    w[rng.integers(0, n, 9), np.arange(9)] = 1.0
    y = masks @ w + 0.1 * rng.standard_normal((m, 9))
    k = m - 10
    one = fit_datamodels(masks[:k], y[:k], masks[k:], y[k:], n_lambdas=6, memory_mb=512)
    steps = []
    many = fit_datamodels(masks[:k], y[:k], masks[k:], y[k:], n_lambdas=6, memory_mb=0.01,
                          on_step=lambda i, k: steps.append((i, k)))
    assert steps[-1][0] == steps[-1][1] and steps[-1][1] > 6       # several blocks, all reported
    np.testing.assert_allclose(one.weight, many.weight, rtol=1e-6, atol=1e-9)   # BLAS blocking aside
    np.testing.assert_allclose(one.lam, many.lam, rtol=1e-12)
    assert one.converged.all() and np.all(one.gap <= 1e-6)


def test_path_selection_recovers_sparse_datamodel():
    rng = np.random.default_rng(1)
    masks = rng.random((300, 40)) < 0.5
    w = np.zeros((40, 2))
    w[3, 0], w[7, 1], w[8, 1] = 1.0, -0.8, 0.6
    y = masks @ w + 0.5 + 0.05 * rng.standard_normal((300, 2))
    fit = fit_datamodels(masks[:250], y[:250], masks[250:], y[250:], n_lambdas=12, eps=1e-3)
    assert fit.weight.shape == (40, 2)
    assert abs(fit.weight[3, 0] - 1.0) < 0.1 and abs(fit.weight[7, 1] + 0.8) < 0.1
    off = np.ones_like(fit.weight, bool)
    off[[3, 7, 8], [0, 1, 1]] = False
    assert np.abs(fit.weight[off]).max() < 0.1
    pred = masks @ fit.weight + fit.bias
    assert np.abs(pred - y).mean() < 0.1


def test_both_solvers_fit_the_same_datamodels():
    rng = np.random.default_rng(4)
    masks = rng.random((200, 120)) < 0.5
    w = np.zeros((120, 5))
    w[rng.integers(0, 120, 5), np.arange(5)] = 1.0
    y = masks @ w + 0.2 * rng.standard_normal((200, 5))
    cd = fit_datamodels(masks[:180], y[:180], masks[180:], y[180:], n_lambdas=8, solver="cd")
    fista = fit_datamodels(masks[:180], y[:180], masks[180:], y[180:], n_lambdas=8, solver="fista", max_iter=3000)
    np.testing.assert_array_equal(cd.lam, fista.lam)
    np.testing.assert_allclose(cd.weight, fista.weight, atol=2e-3)
    assert cd.converged.all() and np.all(fista.gap < 5e-3)     # FISTA: float32, stops on step size
    with pytest.raises(ValueError, match="solver"):
        fit_datamodels(masks[:180], y[:180], masks[180:], y[180:], solver="newton")


def test_torch_fista_takes_the_numpy_iterations():
    """The torch solver (CPU here, CUDA where present) is the numpy FISTA, iteration for iteration."""
    from kernels.lasso import duality_gap, lasso_fista, lasso_fista_torch, standardize

    rng = np.random.default_rng(2)
    masks = rng.random((60, 40)) < 0.5
    y = masks @ (rng.standard_normal((40, 5)) * (rng.random((40, 5)) < 0.2)) + 0.1 * rng.standard_normal((60, 5))
    xs, _, _ = standardize(masks)
    yc = y - y.mean(0)
    lam = np.full(5, 0.05)
    ref = lasso_fista(xs.astype(np.float32), yc, lam, max_iter=500, tol=1e-6)
    got = lasso_fista_torch(xs, yc, lam, max_iter=500, tol=1e-6)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.all(duality_gap(xs, yc, got.astype(np.float64), lam) < 1e-3)


# ---- Gram coordinate descent (m >= 2n) ----------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m,n", [(60, 30), (200, 40), (500, 25)])
def test_gram_solver_matches_sklearn(m, n, seed):
    """Many more models than examples: lasso_gram reaches scikit-learn's optimum from lam_max down
    to a tiny lam, and certifies it."""
    from kernels.lasso import lasso_gram

    xs, yc = _problem(m, n, 6, seed=seed)
    lam_max = np.abs(xs.T @ yc).max(0) / m
    lam = lam_max * np.array([0.999, 0.9, 0.3, 0.05, 1e-3, 1e-5])
    fast, gap, sweeps = lasso_gram(xs, yc, lam, tol=1e-10)
    ref = lasso_reference(xs, yc, lam)
    assert np.all(gap <= 1e-10) and np.all(sweeps > 0)
    np.testing.assert_allclose(objective(xs, yc, fast, lam), objective(xs, yc, ref, lam), rtol=1e-6)
    np.testing.assert_allclose(fast, ref, atol=1e-5)          # m > n: one solution, the weights agree
    assert np.count_nonzero(fast[:, 0]) <= 3                  # just under lam_max: (almost) nothing enters


@settings(max_examples=15, deadline=None)
@given(m=st.integers(5, 60), n=st.integers(1, 40), seed=st.integers(0, 2**16), frac=st.floats(0.005, 1.2))
def test_gram_solver_certifies_any_shape(m, n, seed, frac):
    """Off its regime too (m < n: singular Gram, the null-direction step), a converged target is at
    scikit-learn's optimum, and lam >= lam_max gives zero weights."""
    from kernels.lasso import lasso_gram

    xs, yc = _problem(m, n, 2, seed)
    lam = (np.abs(xs.T @ yc).max(0) / m + 1e-12) * frac
    fast, gap, _ = lasso_gram(xs, yc, lam, tol=1e-8)
    ours, theirs = objective(xs, yc, fast, lam), objective(xs, yc, lasso_reference(xs, yc, lam), lam)
    assert np.all(gap <= 1e-8)
    assert np.all(ours <= theirs * (1 + 1e-7) + 1e-15)
    if frac >= 1:
        assert np.all(fast == 0)


def test_gram_duality_gap_equals_the_residual_one():
    """The gap lasso_gram stops on (from G, X'y and y'y, no residual) is duality_gap()'s, at any W:
    zero, random dense and sparse, scaled up (s < 1), and the solver's own answer."""
    from kernels.lasso import _gram_gap, duality_gap, gram_matrix, lasso_gram

    rng = np.random.default_rng(7)
    xs, yc = _problem(150, 40, 3, seed=7)
    m = xs.shape[0]
    G, C, yy = gram_matrix(xs), xs.T @ yc / m, (yc * yc).sum(0)
    lam = np.abs(C).max(0) * np.array([0.5, 0.05, 0.002])
    solved, reported, _ = lasso_gram(xs, yc, lam, tol=1e-9)
    sparse = rng.standard_normal((40, 3)) * (rng.random((40, 3)) < 0.1)
    for w in [np.zeros((40, 3)), 0.1 * rng.standard_normal((40, 3)), sparse, 30 * sparse, solved]:
        ours = []
        for t in range(3):
            primal, gap = _gram_gap(C[:, t], C[:, t] - G @ w[:, t], w[:, t], yy[t], float(m), lam[t])
            ours.append(gap / primal if primal > 0 else 0.0)
        np.testing.assert_allclose(ours, duality_gap(xs, yc, w, lam), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(reported, duality_gap(xs, yc, solved, lam), rtol=1e-6, atol=1e-12)
    assert np.all(reported <= 1e-9)


def test_fit_datamodels_picks_gram_for_many_models(monkeypatch):
    import kernels.lasso as lasso

    assert lasso.choose_solver(200, 100) == "gram" and lasso.choose_solver(5000, 1000) == "gram"
    assert lasso.choose_solver(199, 100) == "fista" and lasso.choose_solver(20, 10_000) == "cd"
    rng = np.random.default_rng(5)
    masks = rng.random((240, 60)) < 0.5            # 240 >= 2 x 60 models (fit + validation)
    w = np.zeros((60, 4))
    w[rng.integers(0, 60, 4), np.arange(4)] = 1.0
    y = masks @ w + 0.2 * rng.standard_normal((240, 4))
    calls = {"gram": 0, "cd": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(lasso, "lasso_gram", spy("gram", lasso.lasso_gram))
    monkeypatch.setattr(lasso, "lasso_cd", spy("cd", lasso.lasso_cd))
    auto = lasso.fit_datamodels(masks[:210], y[:210], masks[210:], y[210:], n_lambdas=8)
    assert calls == {"gram": 8 + 1, "cd": 0}        # the whole path and the refit
    cd = lasso.fit_datamodels(masks[:210], y[:210], masks[210:], y[210:], n_lambdas=8, solver="cd")
    assert calls["cd"] == 9
    np.testing.assert_array_equal(auto.lam, cd.lam)
    np.testing.assert_allclose(auto.weight, cd.weight, atol=1e-4)
    assert auto.converged.all() and np.all(auto.gap <= 1e-6)
