import numpy as np
import pytest
import torch

from kernels.models import build_model
from kernels.npyio import NpyFile
from kernels.trak import finalize_member, per_example_grads, per_example_grads_reference, score_tiles, trak_scores_reference


def test_per_example_grads_match_autograd_loop():
    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 8, 8), 4, 4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    fast = per_example_grads(model, params, x, y, chunk=4)
    ref = per_example_grads_reference(model, params, x, y)
    assert fast.shape == (6, sum(p.numel() for p in params.values()))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def _tiled_scores(tmp_path, phis, tgts, qs, lam, memory_bytes):
    """finalize_member + score_tiles on .npy files, as the attribution stage runs them."""
    m = len(phis)
    train = NpyFile.create(tmp_path / "train.npy", (m, *phis[0].shape), np.float32)
    targets = NpyFile.create(tmp_path / "targets.npy", (m, *tgts[0].shape), np.float32)
    for i in range(m):
        train.write_rows(i, 0, phis[i])
        targets.write_rows(i, 0, tgts[i])
    feats = NpyFile.create(tmp_path / "features.npy", train.shape, np.float32)
    for i in range(m):
        finalize_member(train, i, lam, feats, "cpu", rows=7)            # several row blocks
    out = NpyFile.create(tmp_path / "scores.npy", (tgts[0].shape[0], phis[0].shape[0]), np.float32)
    score_tiles(targets, feats, np.mean(qs, 0), out, "cpu", memory_bytes)
    out.close()
    return np.load(tmp_path / "scores.npy")


@pytest.mark.parametrize("memory_bytes", [1e9, 3000])     # one tile; many tiles of target and training rows
def test_tiled_scores_equal_the_literal_estimator(tmp_path, memory_bytes):
    rng = np.random.default_rng(0)
    phis = [rng.standard_normal((40, 8)).astype(np.float32) for _ in range(3)]
    tgts = [rng.standard_normal((5, 8)).astype(np.float32) for _ in range(3)]
    qs = [rng.uniform(0, 1, 40) for _ in range(3)]
    got = _tiled_scores(tmp_path, phis, tgts, qs, 0.05, memory_bytes)
    assert got.shape == (5, 40)
    np.testing.assert_allclose(got, trak_scores_reference(phis, tgts, qs, 0.05), rtol=1e-4, atol=1e-5)


def test_trak_recovers_linear_regression_influence(tmp_path):
    """For a linear model, TRAK without projection is the leave-one-out direction of OLS."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    tau = _tiled_scores(tmp_path, [x], [x[:1]], [np.ones(60)], 0.0, 1e9)[0]
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(tau, x64 @ np.linalg.inv(x64.T @ x64) @ x64[0], rtol=1e-4, atol=1e-6)


def test_per_example_grads_of_a_batchnorm_model_hold_statistics_fixed():
    torch.manual_seed(0)
    model = build_model("resnet9", (3, 16, 16), 4, 4)
    model.train()
    model(torch.randn(32, 3, 16, 16))          # move the running statistics off their defaults
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    fast = per_example_grads(model, state, x, y)
    ref = per_example_grads_reference(model, state, x, y)
    assert fast.shape == (5, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_out_to_loss_is_one_minus_p_and_never_rounds_to_zero():
    from kernels.trak import out_to_loss

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(50, 4) * torch.logspace(-1, 2, 50)[:, None]     # up to very confident logits
    y = torch.randint(0, 3, (50,))
    q = out_to_loss(model, dict(model.state_dict()), x, y).double()
    p = torch.softmax(model(x).double(), -1).gather(1, y[:, None]).squeeze(1)
    exact = 1 - p
    big = exact > 1e-6
    assert big.any() and (~big).any()
    torch.testing.assert_close(q[big], exact[big], rtol=1e-4, atol=0)
    assert (q > 0).all()                       # 1 - softmax in float32 gives exact zeros here
    assert (1 - torch.softmax(model(x), -1).gather(1, y[:, None]).squeeze(1) == 0).any()


def test_label_mean_effects_match_the_written_out_kernel():
    from kernels.trak import label_mean_effects, label_mean_effects_reference
    rng = np.random.default_rng(0)
    phis = [rng.standard_normal((50, 8)) for _ in range(3)]
    mus = [rng.standard_normal((4, 8)) for _ in range(3)]
    r, b = label_mean_effects(zip(phis, mus), 0.05)
    r_ref, b_ref = label_mean_effects_reference(phis, mus, 0.05)
    np.testing.assert_allclose(r, r_ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(b, b_ref, rtol=1e-8, atol=1e-12)
    assert r.shape == (50, 4) and b.shape == (4, 4)
    # consistent with the train x train scores TRAK stores: R[i, c] is the kernel of example i with
    # the mean of the examples a label's mean was taken over, when those are training examples
    w = np.zeros((4, 50))
    w[np.arange(50) % 4, np.arange(50)] = 1
    w /= w.sum(1, keepdims=True)
    r2, _ = label_mean_effects(((p, w @ p) for p in phis), 0.05)
    qs = [np.ones(50)] * 3
    kern = trak_scores_reference(phis, phis, qs, 0.05).astype(np.float64)
    np.testing.assert_allclose(r2, kern @ w.T, rtol=1e-4, atol=1e-6)


def test_clean_whitened_kernel_matches_the_written_out_kernel():
    from kernels.trak import clean_whitened_kernel, clean_whitened_kernel_reference

    rng = np.random.default_rng(5)
    labels, test_labels = rng.integers(0, 3, 14), np.array([0, 1, 2, 0, 1, 2, 0, 2, 1])
    phis = [rng.standard_normal((14, 4)) for _ in range(3)]
    tests = [rng.standard_normal((9, 4)) for _ in range(3)]
    for rows in (3, 2048):                          # row blocks and one block give the same matrix
        a, t = clean_whitened_kernel(zip(phis, tests), labels, test_labels, 0.05, rows=rows)
        a_ref, t_ref = clean_whitened_kernel_reference(phis, tests, labels, test_labels, 0.05)
        assert a.dtype == t.dtype == np.float32         # n x n storage is float32; each term is float64
        np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6 * np.abs(a_ref).max())
        np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-6 * np.abs(t_ref).max())
    assert np.allclose(a, a.T) and not np.diag(a).any()
    with pytest.raises(ValueError, match=r"labels \[2\] have no test example"):
        clean_whitened_kernel(zip(phis, tests), labels, np.where(test_labels == 2, 0, test_labels), 0.05)
    with pytest.raises(ValueError, match="member 0"):
        clean_whitened_kernel(zip([p[:5] for p in phis], tests), labels, test_labels, 0.05)


def test_whitening_by_the_clean_split_lifts_a_direction_clean_data_does_not_vary_along():
    """Poisons (a quarter of the training set) share an offset along a direction in which clean
    features barely vary.  TRAK's kernel whitens by the training features, poisons included, so it
    scales that direction down by the poisons' own variance; whitened by the clean split it is not,
    and the poison pairs stand out from the clean pairs many times more."""
    from kernels.trak import clean_whitened_kernel, kernel_inverse

    rng = np.random.default_rng(0)
    n, t, k = 400, 300, 8
    scale = np.array([1.0] * (k - 1) + [0.1])      # last direction: quiet in clean data
    phi = rng.standard_normal((n, k)) * scale
    phi_t = rng.standard_normal((t, k)) * scale
    poison = np.zeros(n, bool)
    poison[:100] = True
    phi[poison, -1] += 2.0
    labels, test_labels = np.zeros(n, int), np.zeros(t, int)
    off = ~np.eye(100, dtype=bool)

    def contrast(a):
        return a[np.ix_(poison, poison)][off].mean() / np.abs(a[np.ix_(~poison, ~poison)]).mean()

    a, _ = clean_whitened_kernel([(phi, phi_t)], labels, test_labels, 0.001)
    centred = phi - phi_t.mean(0)
    trak = centred @ kernel_inverse(phi, 0.001) @ centred.T
    assert contrast(a) > 10 * contrast(trak) and contrast(a) > 50


def test_grid_scores_equal_finalized_scores_at_every_prefix_and_ridge(tmp_path):
    """One eigendecomposition per member and k gives every λ; the first k columns stand for a
    k-dimensional projection: the same numbers as finalize_member + score_tiles at (k, λ)."""
    from kernels.trak import grid_scores

    rng = np.random.default_rng(5)
    m, n, t, kmax = 2, 50, 9, 12
    train = NpyFile.create(tmp_path / "train.npy", (m, n, kmax), np.float32)
    test = NpyFile.create(tmp_path / "test.npy", (m, t, kmax), np.float32)
    for i in range(m):
        train.write_rows(i, 0, rng.standard_normal((n, kmax)).astype(np.float32))
        test.write_rows(i, 0, rng.standard_normal((t, kmax)).astype(np.float32))
    q = rng.uniform(0.1, 1, n)
    rows = np.array([1, 4, 8])
    got = dict(grid_scores(train, test, rows, q, [5, 12], [0.01, 1.0], "cpu", rows=16))
    assert set(got) == {(5, 0.01), (5, 1.0), (12, 0.01), (12, 1.0)}
    for (k, lam), scores in got.items():
        phis = [train.rows(i, 0, n)[:, :k] for i in range(m)]
        tgts = [test.rows(i, 0, t)[rows, :k] for i in range(m)]
        ref = trak_scores_reference(phis, tgts, [q] * m, lam)
        np.testing.assert_allclose(scores, ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())
    assert not np.allclose(got[(5, 0.01)], got[(12, 0.01)])
