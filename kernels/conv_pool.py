"""The first block of a small CNN fused into one CPU kernel: 3x3 convolution (padding 1, stride 1)
of a few input channels, ReLU and 2x2 max-pool, forward and backward.

``conv3x3_relu_maxpool2d(x, conv)`` computes ``relu(max_pool2d(conv(x), 2))``.  For the small
CNN on 28x28 images (1 -> 32 channels, batch 64, bf16, one core) PyTorch's ops take 1.64 ms
forward + backward for this block, half as long as the 32 -> 64 convolution after it (3.3 ms)
for 3% of its arithmetic: oneDNN handles a one-channel convolution poorly, and the pool's
backward writes a 64x32x28x28 gradient that the convolution's backward then reads whole.  The
kernels here take 0.69 ms.  Fused, the forward computes the four convolution
outputs of each pooling window in registers and stores only the pooled value and a one-byte
argmax; the backward accumulates the weight gradient straight from the pooled gradient, so the
full-resolution activation and its gradient never exist.

Arithmetic: float32 with float32 accumulation.  Under CPU bfloat16 autocast the input, weight
and bias are first rounded to bfloat16 and the pooled output is returned in bfloat16, as
autocast's convolution would; the weight and bias gradients come back in float32 (autocast's
come back rounded through bfloat16).  The summation order differs from oneDNN's, so values
agree with ``reference`` to rounding, not bit for bit (tests/test_conv_pool.py).

The fast path needs: CPU, no torch.func transform active (TRAK's per-example gradients go
through ``reference``), a float32 input that does not require grad (the first layer: the kernel
computes no input gradient), at most 4 input channels in channels-last (or one-channel) layout,
and a plain 3x3 / padding 1 / stride 1 convolution.  The kernels release the GIL, so models
trained on threads (kernels/train.py) run them in parallel.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import numba
import numpy as np
import torch
from torch import nn

from kernels.pool import NO_GRAD, relu_maxpool2d

MAX_IN_CHANNELS = 4


def reference(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return torch.relu(torch.max_pool2d(conv(x), 2))


@numba.njit(nogil=True, inline="always", cache=True)
def _patch(xp, n, i, j, c):
    """The 4x4 input patch of channel c under pooling window (i, j) of 3x3 convolutions
    (xp zero-padded by one), row by row."""
    r, s = 2 * i, 2 * j
    return (xp[n, r, s, c], xp[n, r, s + 1, c], xp[n, r, s + 2, c], xp[n, r, s + 3, c],
            xp[n, r + 1, s, c], xp[n, r + 1, s + 1, c], xp[n, r + 1, s + 2, c], xp[n, r + 1, s + 3, c],
            xp[n, r + 2, s, c], xp[n, r + 2, s + 1, c], xp[n, r + 2, s + 2, c], xp[n, r + 2, s + 3, c],
            xp[n, r + 3, s, c], xp[n, r + 3, s + 1, c], xp[n, r + 3, s + 2, c], xp[n, r + 3, s + 3, c])


@functools.lru_cache(maxsize=None)
def _kernels(n_out: int):
    """The forward and backward kernels for ``n_out`` output channels.  The channel count is a
    compile-time constant in them: only then does LLVM see that the rows of the small local
    accumulators cannot overlap, and vectorize the channel loops (with a run-time count the
    weight-gradient loop ran scalar, ten times slower).  numba caches each width on disk."""

    @numba.njit(nogil=True, fastmath=True, cache=True)
    def forward(xp, w, b, out, arg):
        """xp: [N, H+2, W+2, C] zero-padded input; w: [C*9, O] (row c*9 + kh*3 + kw); b: [O];
        out: [N, H//2, W//2, O] float32 pooled ReLU output; arg: uint8 window position or NO_GRAD."""
        n_img, ho, wo, _ = out.shape
        n_in = xp.shape[3]
        acc = np.empty((4, n_out), np.float32)
        for n in range(n_img):
            for i in range(ho):
                for j in range(wo):
                    for o in range(n_out):
                        acc[0, o] = b[o]
                        acc[1, o] = b[o]
                        acc[2, o] = b[o]
                        acc[3, o] = b[o]
                    for c in range(n_in):
                        (p00, p01, p02, p03, p10, p11, p12, p13,
                         p20, p21, p22, p23, p30, p31, p32, p33) = _patch(xp, n, i, j, c)
                        t = 9 * c
                        for o in range(n_out):
                            w0, w1, w2 = w[t, o], w[t + 1, o], w[t + 2, o]
                            w3, w4, w5 = w[t + 3, o], w[t + 4, o], w[t + 5, o]
                            w6, w7, w8 = w[t + 6, o], w[t + 7, o], w[t + 8, o]
                            acc[0, o] += (p00 * w0 + p01 * w1 + p02 * w2 + p10 * w3 + p11 * w4 + p12 * w5
                                          + p20 * w6 + p21 * w7 + p22 * w8)
                            acc[1, o] += (p01 * w0 + p02 * w1 + p03 * w2 + p11 * w3 + p12 * w4 + p13 * w5
                                          + p21 * w6 + p22 * w7 + p23 * w8)
                            acc[2, o] += (p10 * w0 + p11 * w1 + p12 * w2 + p20 * w3 + p21 * w4 + p22 * w5
                                          + p30 * w6 + p31 * w7 + p32 * w8)
                            acc[3, o] += (p11 * w0 + p12 * w1 + p13 * w2 + p21 * w3 + p22 * w4 + p23 * w5
                                          + p31 * w6 + p32 * w7 + p33 * w8)
                    for o in range(n_out):
                        # first maximum in window order wins, as in PyTorch; branch-free (which
                        # position wins is random, so branches would mispredict half the time)
                        x0, x1, x2, x3 = acc[0, o], acc[1, o], acc[2, o], acc[3, o]
                        lo, clo = max(x0, x1), np.uint8(x1 > x0)
                        hi, chi = max(x2, x3), np.uint8(2) + np.uint8(x3 > x2)
                        best = max(lo, hi)
                        code = chi if hi > lo else clo
                        out[n, i, j, o] = max(best, np.float32(0))
                        arg[n, i, j, o] = code if best > 0 else np.uint8(NO_GRAD)

    @numba.njit(nogil=True, fastmath=True, cache=True)
    def backward(xp, g, arg, dw, db):
        """g: [N, Ho, Wo, O] float32 pooled-output gradient; dw: [C*9, O] and db: [O], written."""
        n_img, ho, wo, _ = g.shape
        n_in = xp.shape[3]
        gq = np.empty((4, n_out), np.float32)
        acc = np.empty((9, n_out), np.float32)
        bacc = np.empty(n_out, np.float32)
        for c in range(n_in):
            acc[:] = 0
            bacc[:] = 0
            for n in range(n_img):
                for i in range(ho):
                    for j in range(wo):
                        for o in range(n_out):
                            # branch-free routing of the pooled gradient to the window's maximum
                            v, code = g[n, i, j, o], arg[n, i, j, o]
                            gq[0, o] = v * np.float32(code == 0)
                            gq[1, o] = v * np.float32(code == 1)
                            gq[2, o] = v * np.float32(code == 2)
                            gq[3, o] = v * np.float32(code == 3)
                            bacc[o] += v * np.float32(code != NO_GRAD)
                        (p00, p01, p02, p03, p10, p11, p12, p13,
                         p20, p21, p22, p23, p30, p31, p32, p33) = _patch(xp, n, i, j, c)
                        for o in range(n_out):
                            g0, g1, g2, g3 = gq[0, o], gq[1, o], gq[2, o], gq[3, o]
                            acc[0, o] += p00 * g0 + p01 * g1 + p10 * g2 + p11 * g3
                            acc[1, o] += p01 * g0 + p02 * g1 + p11 * g2 + p12 * g3
                            acc[2, o] += p02 * g0 + p03 * g1 + p12 * g2 + p13 * g3
                            acc[3, o] += p10 * g0 + p11 * g1 + p20 * g2 + p21 * g3
                            acc[4, o] += p11 * g0 + p12 * g1 + p21 * g2 + p22 * g3
                            acc[5, o] += p12 * g0 + p13 * g1 + p22 * g2 + p23 * g3
                            acc[6, o] += p20 * g0 + p21 * g1 + p30 * g2 + p31 * g3
                            acc[7, o] += p21 * g0 + p22 * g1 + p31 * g2 + p32 * g3
                            acc[8, o] += p22 * g0 + p23 * g1 + p32 * g2 + p33 * g3
            dw[9 * c:9 * c + 9] = acc
            db[:] = bacc

    return forward, backward


def _bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


class _ConvReluMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bf16: bool):
        n, c, h, w = x.shape
        o = weight.shape[0]
        if bf16:
            x, weight, bias = _bf16_round(x), _bf16_round(weight), _bf16_round(bias)
        xp = torch.zeros((n, h + 2, w + 2, c), dtype=torch.float32)
        xp[:, 1:-1, 1:-1, :] = x.permute(0, 2, 3, 1)
        wt = weight.detach().permute(1, 2, 3, 0).reshape(9 * c, o).contiguous()
        out = torch.empty((n, h // 2, w // 2, o), dtype=torch.float32)
        arg = torch.empty((n, h // 2, w // 2, o), dtype=torch.uint8)
        _kernels(o)[0](xp.numpy(), wt.numpy(), bias.detach().contiguous().numpy(), out.numpy(), arg.numpy())
        ctx.xp, ctx.arg, ctx.w_shape = xp, arg, weight.shape
        ctx.mark_non_differentiable(arg)
        out = out.permute(0, 3, 1, 2)                # channels-last [N, O, H//2, W//2]
        return out.to(torch.bfloat16) if bf16 else out

    @staticmethod
    def backward(ctx, g):
        o, c = ctx.w_shape[0], ctx.w_shape[1]
        g = g.float().permute(0, 2, 3, 1).contiguous()
        dw = torch.empty((9 * c, o), dtype=torch.float32)
        db = torch.empty(o, dtype=torch.float32)
        _kernels(o)[1](ctx.xp.numpy(), g.numpy(), ctx.arg.numpy(), dw.numpy(), db.numpy())
        return None, dw.reshape(c, 3, 3, o).permute(3, 0, 1, 2).contiguous(), db, None


def _autocast_bf16() -> bool | None:
    """True under CPU bfloat16 autocast, False without autocast, None for other autocast dtypes."""
    if not torch.is_autocast_enabled("cpu"):
        return False
    return True if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None


_FUSED = [True]


@contextmanager
def unfused():
    """Within the block, ``conv3x3_relu_maxpool2d`` always calls the Conv2d module (never the fused
    kernel, which bypasses it): for code that hooks the modules (kernels/projectors.py reads each
    Conv2d's input and output gradient)."""
    old = _FUSED[0]
    _FUSED[0] = False
    try:
        yield
    finally:
        _FUSED[0] = old


def fast_path_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    return (_FUSED[0] and not torch._C._are_functorch_transforms_active() and x.device.type == "cpu"
            and x.dtype == torch.float32 and not x.requires_grad and x.ndim == 4
            and 1 <= x.shape[1] <= MAX_IN_CHANNELS and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.is_contiguous(memory_format=torch.channels_last)
            and conv.weight.dtype == torch.float32 and conv.weight.device.type == "cpu" and conv.bias is not None
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and _autocast_bf16() is not None)


def conv3x3_relu_maxpool2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))``: the fused numba kernels where ``fast_path_applies``, else
    PyTorch's convolution followed by kernels/pool.py's ReLU + max-pool."""
    if fast_path_applies(x, conv):
        return _ConvReluMaxPool.apply(x, conv.weight, conv.bias, _autocast_bf16())
    return relu_maxpool2d(conv(x))
