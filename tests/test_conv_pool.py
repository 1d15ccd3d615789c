"""kernels/conv_pool.py: the fused first block (3x3 conv + ReLU + 2x2 max-pool) agrees with
PyTorch's convolution, ReLU and max-pool: values, window choices and weight/bias gradients."""
import pytest
import torch
from torch import nn

from kernels.conv_pool import conv3x3_relu_maxpool2d, fast_path_applies, reference
from kernels.models import SmallCNN


def _conv(c_in, c_out, seed):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)


def _run(fn, x, conv, g, bf16):
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = fn(x, conv)
    y.backward(g.to(y.dtype))
    return y, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("c_in,c_out,h,w", [(1, 32, 28, 28), (3, 16, 32, 32), (2, 8, 7, 9), (4, 48, 6, 6)])
def test_float32_agrees_with_pytorch(c_in, c_out, h, w):
    conv = _conv(c_in, c_out, c_in * 100 + c_out)
    gen = torch.Generator().manual_seed(h * w)
    x = torch.randn(5, c_in, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    g = torch.randn(5, c_out, h // 2, w // 2, generator=gen)
    assert fast_path_applies(x, conv)
    ya, wa, ba = _run(conv3x3_relu_maxpool2d, x, conv, g, False)
    yb, wb, bb = _run(reference, x, conv, g, False)
    assert ya.shape == yb.shape and ya.dtype == yb.dtype == torch.float32
    assert ya.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ba, bb, rtol=1e-4, atol=1e-4)
    assert wa.dtype == ba.dtype == torch.float32


def test_bfloat16_autocast_matches_float32_math_on_rounded_operands():
    """Under CPU bf16 autocast the kernel rounds input, weight and bias to bf16 and the output to
    bf16, like autocast's convolution; its gradients are float32 sums of those same products."""
    conv = _conv(1, 32, 7)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1, 28, 28, generator=gen)
    g = torch.randn(8, 32, 14, 14, generator=gen).to(torch.bfloat16)
    ya, wa, ba = _run(conv3x3_relu_maxpool2d, x, conv, g, True)
    assert ya.dtype == torch.bfloat16

    # float32 reference on the bf16-rounded operands
    r = _conv(1, 32, 7)
    with torch.no_grad():
        r.weight.copy_(r.weight.to(torch.bfloat16).float())
        r.bias.copy_(r.bias.to(torch.bfloat16).float())
    yb, wb, bb = _run(reference, x.to(torch.bfloat16).float(), r, g.float(), False)
    torch.testing.assert_close(ya, yb.to(torch.bfloat16), rtol=0, atol=0.02)
    assert (ya == yb.to(torch.bfloat16)).float().mean() > 0.99
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ba, bb, rtol=1e-4, atol=1e-3)

    # and near what autocast's own convolution gives.  Autocast picks the window maximum among
    # bf16-rounded outputs, where neighbours often tie, and its weight gradient passes through
    # bf16: here it is 4% (relative norm) from the exact gradient that the kernel gives to 1e-6.
    yc, wc, bc = _run(reference, x, _conv(1, 32, 7), g, True)
    assert (ya == yc).float().mean() > 0.99
    assert (wa - wc).norm() / wc.norm() < 0.1
    assert (wa - wb).norm() / wb.norm() < 1e-5 < (wc - wb).norm() / wb.norm()


def test_ties_take_the_first_window_position():
    """A constant image makes all four convolutions of a window equal (away from the border):
    the gradient must go to the first position, as PyTorch's max-pool sends it."""
    conv = _conv(1, 4, 1)
    x = torch.ones(1, 1, 8, 8)
    g = torch.ones(1, 4, 4, 4)
    ya, wa, ba = _run(conv3x3_relu_maxpool2d, x, conv, g, False)
    yb, wb, bb = _run(reference, x, conv, g, False)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(wa, wb)
    torch.testing.assert_close(ba, bb)


def test_falls_back_outside_the_fast_path():
    conv = _conv(1, 8, 0)
    x = torch.randn(2, 1, 8, 8)
    assert not fast_path_applies(x.clone().requires_grad_(), conv)      # needs an input gradient
    assert not fast_path_applies(x.double(), conv)
    assert not fast_path_applies(torch.randn(2, 8, 8, 8), _conv(8, 4, 0))  # too many input channels
    assert not fast_path_applies(x, nn.Conv2d(1, 8, 3, padding=1, bias=False))
    assert not fast_path_applies(x, nn.Conv2d(1, 8, 5, padding=2))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fast_path_applies(x, conv)
    xs = torch.randn(3, 2, 1, 8, 8)                  # under torch.func (TRAK's per-example grads)
    out = torch.func.vmap(lambda t: conv3x3_relu_maxpool2d(t, conv))(xs)
    torch.testing.assert_close(out, torch.stack([reference(t, conv) for t in xs]))


def test_small_cnn_trains_the_same_through_either_path():
    """One SGD step of the small CNN through the fused block equals the step through PyTorch's
    ops (float32, to rounding)."""
    torch.manual_seed(0)
    a = SmallCNN((1, 28, 28), 10, 16).to(memory_format=torch.channels_last)
    b = SmallCNN((1, 28, 28), 10, 16)
    b.load_state_dict(a.state_dict())
    b.embed = lambda x: torch.relu(torch.max_pool2d(b.conv2(reference(x, b.conv1)), 2)).flatten(1)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for m in (a, b):
        nn.functional.cross_entropy(m(x), y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_backward_twice_with_retained_graph():
    conv = _conv(1, 8, 2)
    x = torch.randn(2, 1, 8, 8)
    y = conv3x3_relu_maxpool2d(x, conv)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, conv.weight, g, retain_graph=True)[0]
    second = torch.autograd.grad(y, conv.weight, g)[0]
    assert torch.equal(first, second)
