import numpy as np

from kernels.lasso import fit_datamodels, lasso_fista, lasso_reference, objective, standardize


def test_fista_matches_sklearn_coordinate_descent():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (80, 30)).astype(float)
    w_true = np.zeros((30, 3))
    w_true[[1, 5, 9], [0, 1, 2]] = [2.0, -1.5, 1.0]
    y = x @ w_true + 0.1 * rng.standard_normal((80, 3))
    xs, _, _ = standardize(x)
    yc = y - y.mean(0)
    lam = np.array([0.05, 0.1, 0.02])
    fast = lasso_fista(xs, yc, lam, max_iter=20000, tol=1e-10)
    ref = lasso_reference(xs, yc, lam)
    np.testing.assert_allclose(objective(xs, yc, fast, lam), objective(xs, yc, ref, lam), rtol=1e-6)
    np.testing.assert_allclose(fast, ref, atol=1e-4)


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
