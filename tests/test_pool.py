"""kernels/pool.py: the numba ReLU + 2x2 max-pool equals PyTorch's, values and gradients, bit for bit."""
import pytest
import torch

from kernels.pool import fast_path_applies, reference, relu_maxpool2d


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 7, 9, 11), (4, 16, 28, 28), (197, 6, 9, 7)])
def test_forward_and_backward_equal_pytorch(dtype, shape):
    """(The last shape is a batch large enough to be split over the two threads the suite runs
    with: slices of the batch on threads give the same bits.)"""
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(shape, generator=g).to(dtype))
    # ties, zeros and negative zeros on purpose: quantize a third of the entries
    x[..., ::3] = (x[..., ::3] * 2).round() / 2
    x[0, 0, 0, :2] = -0.0
    assert fast_path_applies(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = relu_maxpool2d(xa), reference(xb)
    assert ya.dtype == yb.dtype and ya.shape == yb.shape
    assert torch.equal(ya, yb)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    go = torch.randn(ya.shape, generator=g).to(dtype)
    for grad in (go, _cl(go)):     # the gradient arrives in either layout
        ga, = torch.autograd.grad(ya, xa, grad, retain_graph=True)
        gb, = torch.autograd.grad(yb, xb, grad, retain_graph=True)
        assert torch.equal(ga, gb)


def test_max_pool_then_relu_is_relu_then_max_pool():
    """The model may write either order; the kernel implements both."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    a = torch.relu(torch.max_pool2d(x, 2))
    b = torch.max_pool2d(torch.relu(x), 2)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    assert torch.equal(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0])


def test_falls_back_outside_the_fast_path():
    x = torch.randn(2, 3, 6, 6)                      # not channels-last
    assert not fast_path_applies(x)
    assert torch.equal(relu_maxpool2d(x), reference(x))
    xc = _cl(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert not fast_path_applies(xc)
    xs = torch.randn(4, 3, 3, 6, 6)                  # under torch.func transforms (TRAK's per-example grads)
    assert torch.equal(torch.func.vmap(relu_maxpool2d)(xs), torch.stack([reference(x) for x in xs]))
