"""The two projectors of TRAK's gradient features, the block-wise .npy files, batched Q."""
import numpy as np
import pytest
import torch
from torch import nn

from kernels.models import build_model
from kernels.npyio import NpyFile
from kernels.projectors import (DenseMatrix, DenseProjector, FactoredProjector, batched_out_to_loss,
                                dense_matrix_reference, dense_reference, factored_reference, plan_factored)
from kernels.trak import out_to_loss

CASES = [("mlp", (1, 8, 8), 16), ("small_cnn", (1, 12, 12), 4), ("resnet9", (3, 16, 16), 4), ("logreg", (1, 6, 6), 0)]


def _model(arch, shape, hidden):
    torch.manual_seed(0)
    m = build_model(arch, shape, 10, hidden or 64)
    state = m.state_dict()
    for k, v in state.items():              # biases, norm parameters and running statistics off their defaults
        if "running_mean" in k or k.endswith("bias") or (k.endswith("weight") and v.ndim == 1):
            v.normal_()
        if "running_var" in k:
            v.uniform_(0.5, 2)
    params = {k: v.clone() for k, v in state.items()}
    x, y = torch.randn(7, *shape), torch.randint(0, 10, (7,))
    return m, params, x, y


@pytest.mark.parametrize("arch,shape,hidden", CASES)
@pytest.mark.parametrize("k", [64, 300])
def test_factored_projection_is_the_kronecker_projection_of_the_gradient(arch, shape, hidden, k):
    """Every layer's weight gradient times P_out ⊗ P_in and the rest times a dense matrix, from
    per-example autograd gradients: the hook path equals it, with chunks of 1-3 examples."""
    m, params, x, y = _model(arch, shape, hidden)
    fast = FactoredProjector(m, params, k, seed=3, memory_bytes=4e3, device="cpu")
    got = fast(x, y)
    assert fast.chunk(x) < len(x)                      # the budget forced several chunks
    ref = factored_reference(m, params, x, y, k, seed=3)
    assert got.shape == (7, k)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert fast.plan.k_rest > 0 and fast.plan.k_factored + fast.plan.k_rest <= k
    other = FactoredProjector(m, params, k, seed=4, memory_bytes=4e3, device="cpu")(x, y)
    assert not torch.allclose(other, got)


@pytest.mark.parametrize("arch,shape,hidden", CASES[:3])
def test_dense_projection_equals_the_explicit_matrix_across_chunks(arch, shape, hidden):
    m, params, x, y = _model(arch, shape, hidden)
    small = DenseProjector(m, params, 48, seed=5, memory_bytes=2e4, device="cpu")
    ref = dense_reference(m, params, x, y, 48, seed=5)
    got = small(x, y)
    assert small.chunk(x) < len(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    torch.testing.assert_close(DenseProjector(m, params, 48, seed=5, memory_bytes=1e9, device="cpu")(x, y), got,
                               rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_dense_matrix_blocks_cached_or_regenerated_are_the_same_matrix():
    g = torch.randn(5, 300)
    full = dense_matrix_reference(300, 16, seed=3, block_rows=64)
    assert set(np.unique(full.numpy() * 4).round(6)) == {-1.0, 1.0}
    for cache in (0, float("inf")):
        mat = DenseMatrix(300, 16, 3, "cpu", cache_bytes=cache, block_rows=64)
        torch.testing.assert_close(mat(g), g @ full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mat(g), g @ full, rtol=1e-5, atol=1e-5)     # second call: the cache
    assert not torch.equal(dense_matrix_reference(300, 16, seed=4, block_rows=64), full)


def test_factored_projection_preserves_inner_products_in_expectation():
    """E[(P_out ⊗ P_in)ᵀ] (P_out ⊗ P_in) = I: over many seeds the mean projected inner product of
    two examples' gradients is their true inner product (the scaling of both factors is right)."""
    m, params, x, y = _model("mlp", (1, 6, 6), 8)
    g = torch.stack([torch.cat([p.grad.flatten() for p in _grads(m, params, xi, yi)]) for xi, yi in zip(x[:2], y[:2])])
    true = float(g[0] @ g[1])
    est = []
    for s in range(300):
        f = FactoredProjector(m, params, 40, seed=s, memory_bytes=1e9, device="cpu")(x[:2], y[:2]).double()
        est.append(float(f[0] @ f[1]))
    est = np.array(est)
    assert abs(est.mean() - true) < 4 * est.std() / np.sqrt(len(est)) + 1e-3 * abs(true)


def _grads(m, params, xi, yi):
    from kernels.models import margin

    mm = build_model("mlp", (1, 6, 6), 10, 8)
    mm.load_state_dict(params)
    mm.zero_grad()
    margin(mm(xi[None]), yi[None]).sum().backward()
    return list(mm.parameters())


def test_factored_refuses_what_it_cannot_project():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.ln = nn.LayerNorm(3)

        def forward(self, x):
            return self.ln(self.fc(x.flatten(1)))

    with pytest.raises(ValueError, match="'ln' \\(LayerNorm\\).*trak.projector: dense"):
        plan_factored(WithNorm(), 64)
    with pytest.raises(ValueError, match="trak.proj_dim: 2 is too small"):
        plan_factored(build_model("resnet9", (3, 16, 16), 10, 4), 2)


def test_batched_out_to_loss_equals_the_full_forward():
    m, params, x, y = _model("resnet9", (3, 16, 16), 4)
    torch.testing.assert_close(batched_out_to_loss(m, params, x, y, batch=3), out_to_loss(m, params, x, y),
                               rtol=1e-5, atol=1e-6)


def test_npy_blocks_round_trip_and_open_as_numpy(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 10, 4)).astype(np.float32)
    f = NpyFile.create(tmp_path / "a.npy", a.shape, np.float32)
    for i in range(3):
        for r in range(0, 10, 3):
            f.write_rows(i, r, a[i, r:r + 3])
    f.close()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", mmap_mode="r")[1], a[1])
    with NpyFile(tmp_path / "a.npy") as g:
        np.testing.assert_array_equal(g.rows(2, 4, 9), a[2, 4:9])
        np.testing.assert_array_equal(g.read(1, 3), a[1:3])
        np.testing.assert_array_equal(g.rows(0, 8, 99), a[0, 8:])            # clipped at the end
    np.save(tmp_path / "b.npy", a[0])                                          # a version-1.0 header
    with NpyFile(tmp_path / "b.npy") as g:
        np.testing.assert_array_equal(g.read(2, 5), a[0, 2:5])
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="t.npy: truncated"):
        NpyFile(tmp_path / "t.npy")
    (tmp_path / "x.npy").write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match="x.npy: not a .npy file"):
        NpyFile(tmp_path / "x.npy")


def test_factored_plans_fill_exactly_k_and_never_exceed_a_layer():
    """Any stack of Linear layers and any k that fits: the layers' k_in * k_out plus the dense part
    never exceed k, each factor stays within its layer, and the features have exactly k columns."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 300), min_size=2, max_size=6), st.integers(8, 3000),
           st.sampled_from(["params", "uniform"]))
    def check(widths, k, allocation):
        model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
        layers = len(widths) - 1
        if k < layers + min(k // 8, sum(widths[1:])):
            with pytest.raises(ValueError, match="too small"):
                plan_factored(model, k, allocation)
            return
        plan = plan_factored(model, k, allocation)
        assert plan.k_factored + plan.k_rest <= k
        assert all(1 <= lp.k_in <= lp.d_in and 1 <= lp.k_out <= lp.d_out for lp in plan.layers)
        assert plan.k_rest <= plan.p_rest

    check()
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    params = {k: v.clone() for k, v in m.state_dict().items()}
    out = FactoredProjector(m, params, 50, 0, 1e6, "cpu")(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
    assert out.shape == (4, 50)
