"""ReLU after a 2x2 max-pool, forward and backward, for channels-last CPU tensors.

``relu_maxpool2d(x)`` computes ``relu(max_pool2d(x, 2))`` (equal to ``max_pool2d(relu(x), 2)``:
ReLU is monotone, so the two orders agree in value and in gradient).  On the CPU, PyTorch's
max-pool takes as long as the convolution before it (1.7 ms forward + backward for a
64x32x28x28 bfloat16 batch on one core, against 3.3 ms for the 32->64 convolution that follows),
and its backward first zero-fills the whole input gradient.  Here one pass reads the input
once and writes the pooled output and a one-byte argmax; the backward writes every input
gradient element exactly once.

No floating-point arithmetic happens: float32 / bfloat16 values are compared through their
bit patterns (for IEEE sign-magnitude numbers ``b ^ ((b >> (bits-1)) & max_positive)`` orders
like the floats), and gradients are copied.  So the result equals PyTorch's bit for bit,
including ties (the first maximum in row-major window order wins, as in PyTorch) — see
tests/test_pool.py, which checks it against ``reference``.

The fast path takes CPU tensors in channels-last layout (float32 or bfloat16) outside torch.func
transforms; anything else goes through ``reference``.  The kernels release the GIL, so models
trained concurrently on threads (kernels/train.py) pool in parallel.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

NO_GRAD = 4   # argmax code: the pooled value was <= 0, ReLU passes no gradient


def reference(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.max_pool2d(x, 2))


@numba.njit(nogil=True, cache=True)
def _forward(x, out, arg, sign_mask):
    """x: [N, H, W, C] integer view of the floats; out: [N, H//2, W//2, C]; arg: uint8 codes."""
    n, ho, wo, c = out.shape
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for k in range(c):
                    best = x[b, 2 * i, 2 * j, k]
                    kb = best ^ ((best >> sign_mask[0]) & sign_mask[1])
                    code = 0
                    v = x[b, 2 * i, 2 * j + 1, k]
                    kv = v ^ ((v >> sign_mask[0]) & sign_mask[1])
                    if kv > kb:
                        best, kb, code = v, kv, 1
                    v = x[b, 2 * i + 1, 2 * j, k]
                    kv = v ^ ((v >> sign_mask[0]) & sign_mask[1])
                    if kv > kb:
                        best, kb, code = v, kv, 2
                    v = x[b, 2 * i + 1, 2 * j + 1, k]
                    kv = v ^ ((v >> sign_mask[0]) & sign_mask[1])
                    if kv > kb:
                        best, kb, code = v, kv, 3
                    if kb > 0:        # positive float (NaN with the sign bit clear counts as positive)
                        out[b, i, j, k] = best
                        arg[b, i, j, k] = code
                    else:
                        out[b, i, j, k] = 0
                        arg[b, i, j, k] = NO_GRAD


@numba.njit(nogil=True, cache=True)
def _backward(g, arg, gin):
    """g: [N, Ho, Wo, C] output gradient (integer view); gin: [N, H, W, C].

    One loop per output row: with the four rows written in one loop LLVM cannot rule out that
    they overlap and stays scalar (190 us for a 64x64x14x14 batch); split, each loop is a
    vector select (33 us)."""
    n, h, w, c = gin.shape
    ho, wo = arg.shape[1], arg.shape[2]
    zero = gin.dtype.type(0)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                a, v = arg[b, i, j], g[b, i, j]
                r0, r1 = gin[b, 2 * i, 2 * j], gin[b, 2 * i, 2 * j + 1]
                r2, r3 = gin[b, 2 * i + 1, 2 * j], gin[b, 2 * i + 1, 2 * j + 1]
                for k in range(c):
                    r0[k] = v[k] if a[k] == 0 else zero
                for k in range(c):
                    r1[k] = v[k] if a[k] == 1 else zero
                for k in range(c):
                    r2[k] = v[k] if a[k] == 2 else zero
                for k in range(c):
                    r3[k] = v[k] if a[k] == 3 else zero
        for i in range(2 * ho, h):        # odd height: the last row is not pooled
            for j in range(w):
                for k in range(c):
                    gin[b, i, j, k] = 0
        for i in range(2 * ho):           # odd width: nor the last column
            for j in range(2 * wo, w):
                for k in range(c):
                    gin[b, i, j, k] = 0


_INT = {torch.float32: (torch.int32, np.array([31, 0x7FFFFFFF], np.int32)),
        torch.bfloat16: (torch.int16, np.array([15, 0x7FFF], np.int16))}


def _nhwc(t: torch.Tensor, as_int) -> np.ndarray:
    return t.view(as_int).permute(0, 2, 3, 1).numpy()


_POOL: list = []


def _split_batch(kernel, n: int, *arrays) -> None:
    """``kernel(*arrays)`` over the batch axis, on torch's intra-op thread count: the kernels release
    the GIL, so slices of a large batch run in parallel (one big batch in one process: TRAK's
    featurization).  With one thread (training, one model per core) it is one call, as before."""
    threads = min(torch.get_num_threads(), n // 64)
    if threads <= 1:
        kernel(*arrays)
        return
    if not _POOL or _POOL[0]._max_workers < threads:
        from concurrent.futures import ThreadPoolExecutor

        _POOL[:] = [ThreadPoolExecutor(threads, thread_name_prefix="relu-maxpool")]
    bounds = np.linspace(0, n, threads + 1).astype(int)
    list(_POOL[0].map(lambda se: kernel(*(a[se[0]:se[1]] for a in arrays)), zip(bounds[:-1], bounds[1:])))


class _ReluMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        as_int, mask = _INT[x.dtype]
        out = torch.empty((n, h // 2, w // 2, c), dtype=x.dtype).permute(0, 3, 1, 2)
        arg = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
        xs, outs, args = _nhwc(x, as_int), _nhwc(out, as_int), arg.numpy()
        _split_batch(lambda a, b, c_: _forward(a, b, c_, mask), n, xs, outs, args)
        ctx.save_for_backward(arg)
        ctx.in_shape = (n, c, h, w)
        ctx.mark_non_differentiable(arg)
        return out

    @staticmethod
    def backward(ctx, g):
        (arg,) = ctx.saved_tensors
        n, c, h, w = ctx.in_shape
        as_int, _ = _INT[g.dtype]
        # flatten()'s backward hands over an NCHW gradient: one transposing copy makes the
        # kernel's channel loops unit-stride (64x64x14x14 bf16: 185 -> 110 us, copy included)
        g = g.contiguous(memory_format=torch.channels_last)
        gin = torch.empty((n, h, w, c), dtype=g.dtype).permute(0, 3, 1, 2)
        _split_batch(_backward, n, _nhwc(g, as_int), arg.numpy(), _nhwc(gin, as_int))
        return gin


def fast_path_applies(x: torch.Tensor) -> bool:
    return (not torch._C._are_functorch_transforms_active() and x.device.type == "cpu" and x.dtype in _INT
            and x.ndim == 4 and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.is_contiguous(memory_format=torch.channels_last))


def relu_maxpool2d(x: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(x, 2))``; the numba kernels where ``fast_path_applies``, else PyTorch."""
    return _ReluMaxPool.apply(x) if fast_path_applies(x) else reference(x)
