"""Batch image transforms, compiled with numba and fused into one pass over the batch.

Users compose ops into a ``Pipeline``::

    Pipeline([RandomHorizontalFlip(), RandomTranslate(2), Cutout(8), Normalize(mean, std),
              ToDtype("float32"), ChannelsLast()])

Random parameters are drawn for the whole batch first (``Pipeline.draw``, from a seeded
``numpy.random.Generator``); then one compiled kernel reads each source image once and writes
each output element once: the gather by index, flip, translate (zero padding), cutout and the
normalize/convert step (a 256-entry lookup table per channel, so float32 and float16 cost the
same) all happen in that single pass.  ``RandomResizedCrop`` resamples (bilinear) in a kernel of
its own before it.  Every op has a plain NumPy ``reference`` applied one image at a time, and
``Pipeline.reference`` runs them in sequence on the same draws; tests/test_transforms.py checks
the two agree.

Geometric and pixel ops take effect in this fixed order, whatever order they are listed in:
resized crop -> flip -> translate -> cutout -> normalize -> dtype -> layout.  A pipeline that
lists them otherwise is refused, so what you write is what runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

ORDER = ("RandomResizedCrop", "RandomHorizontalFlip", "RandomTranslate", "Cutout", "Normalize", "ToDtype",
         "ChannelsLast")


class Op:
    """A transform: declares parameters to draw and a reference on one HxWxC image."""

    def draw(self, rng: np.random.Generator, batch: int, shape: tuple) -> dict:
        return {}


@dataclass(frozen=True)
class RandomResizedCrop(Op):
    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, rng, batch, shape):
        h, w = shape[:2]
        area = h * w
        boxes = np.zeros((batch, 4), np.float64)  # top, left, height, width (source pixels)
        for b in range(batch):
            for _ in range(10):
                a = area * rng.uniform(*self.scale)
                r = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
                cw, ch = np.sqrt(a * r), np.sqrt(a / r)
                if 0 < cw <= w and 0 < ch <= h:
                    boxes[b] = (rng.uniform(0, h - ch), rng.uniform(0, w - cw), ch, cw)
                    break
            else:  # fall back to the whole image
                boxes[b] = (0, 0, h, w)
        return {"box": boxes}

    @staticmethod
    def reference(img, box, size):
        """Bilinear resampling of the box to ``size`` (pixel centres, edge clamped)."""
        h, w, c = img.shape
        oh, ow = size
        top, left, bh, bw = box
        ys = top + (np.arange(oh) + 0.5) * bh / oh - 0.5
        xs = left + (np.arange(ow) + 0.5) * bw / ow - 0.5
        ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        f = img.astype(np.float64)
        top_row = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
        bot_row = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
        return np.clip(np.floor(top_row * (1 - wy) + bot_row * wy + 0.5), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class RandomHorizontalFlip(Op):
    p: float = 0.5

    def draw(self, rng, batch, shape):
        return {"flip": rng.random(batch) < self.p}

    @staticmethod
    def reference(img, flip):
        return img[:, ::-1] if flip else img


@dataclass(frozen=True)
class RandomTranslate(Op):
    """Shift by (dy, dx) uniform in [-padding, padding], filling with ``fill`` (pad + random crop)."""

    padding: int = 2
    fill: int = 0

    def draw(self, rng, batch, shape):
        return {"ty": rng.integers(-self.padding, self.padding + 1, batch),
                "tx": rng.integers(-self.padding, self.padding + 1, batch)}

    @staticmethod
    def reference(img, ty, tx, fill):
        h, w, _ = img.shape
        out = np.full_like(img, fill)
        ys, yd = max(0, -ty), max(0, ty)
        xs, xd = max(0, -tx), max(0, tx)
        hh, ww = h - abs(ty), w - abs(tx)
        if hh > 0 and ww > 0:
            out[yd:yd + hh, xd:xd + ww] = img[ys:ys + hh, xs:xs + ww]
        return out


@dataclass(frozen=True)
class Cutout(Op):
    """A size x size square, centred uniformly in the image and clipped to it, set to ``fill``."""

    size: int = 8
    fill: int = 0

    def draw(self, rng, batch, shape):
        h, w = shape[:2]
        return {"cy": rng.integers(0, h, batch), "cx": rng.integers(0, w, batch)}

    @staticmethod
    def reference(img, cy, cx, size, fill):
        out = img.copy()
        y0, x0 = max(0, cy - size // 2), max(0, cx - size // 2)
        out[y0:max(0, cy - size // 2 + size), x0:max(0, cx - size // 2 + size)] = fill
        return out


@dataclass(frozen=True)
class Normalize(Op):
    """uint8 -> (x / 255 - mean) / std, per channel (mean, std in [0, 1] units)."""

    mean: tuple
    std: tuple


@dataclass(frozen=True)
class ToDtype(Op):
    dtype: str = "float32"   # float32 | float16 | uint8 (uint8 only without Normalize)


@dataclass(frozen=True)
class ChannelsLast(Op):
    """Keep H x W x C memory (a NCHW view in torch's channels_last format); without it, C x H x W."""


def _lut(mean, std, channels: int, dtype) -> np.ndarray:
    """256 x C table: the normalized value of every uint8 level, in float32 arithmetic."""
    v = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
    if mean is None:
        table = np.repeat(np.arange(256, dtype=np.float32)[:, None], channels, 1)
    else:
        m = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
        s = np.broadcast_to(np.asarray(std, np.float32), (channels,))
        table = (v - m) / s
    return np.ascontiguousarray(table.astype(dtype))


# ------------------------------------------------------------------ compiled kernels


@numba.njit(parallel=True, nogil=True, cache=True)
def _fused(src, idx, lut, flip, ty, tx, cy, cx, cut, fill, out):
    """One pass per output element: gather, flip, translate, cutout, lookup-table convert.

    ``out`` is indexed [b, y, x, ch]: channels-first output is passed as a transposed view, so
    numba compiles one specialization per memory layout and the loops carry no layout branch.
    Rows (and the columns of a row) that fall outside the source after translation are written
    with the fill value without reading; the cutout square is written last, over the result.
    """
    n_b = idx.shape[0]
    h, w, c = src.shape[1], src.shape[2], src.shape[3]
    half = cut // 2
    for b in prange(n_b):
        s = idx[b]
        t_y, t_x = ty[b], tx[b]
        x0 = min(w, max(0, t_x))           # shifts of a whole width or more leave no source column
        x1 = max(x0, min(w, w + t_x))
        for y in range(h):
            sy = y - t_y
            if sy < 0 or sy >= h:
                for x in range(w):
                    for ch in range(c):
                        out[b, y, x, ch] = lut[fill, ch]
                continue
            for x in range(x0):
                for ch in range(c):
                    out[b, y, x, ch] = lut[fill, ch]
            for x in range(x1, w):
                for ch in range(c):
                    out[b, y, x, ch] = lut[fill, ch]
            step = -1 if flip[b] else 1
            first = w - 1 - x0 + t_x if flip[b] else x0 - t_x
            if c == 3:      # the common case, unrolled
                for x in range(x0, x1):
                    p = first + step * (x - x0)
                    out[b, y, x, 0] = lut[src[s, sy, p, 0], 0]
                    out[b, y, x, 1] = lut[src[s, sy, p, 1], 1]
                    out[b, y, x, 2] = lut[src[s, sy, p, 2], 2]
            else:
                for x in range(x0, x1):
                    p = first + step * (x - x0)
                    for ch in range(c):
                        out[b, y, x, ch] = lut[src[s, sy, p, ch], ch]
        if cut > 0:
            for y in range(max(0, cy[b] - half), min(h, cy[b] - half + cut)):
                for x in range(max(0, cx[b] - half), min(w, cx[b] - half + cut)):
                    for ch in range(c):
                        out[b, y, x, ch] = lut[fill, ch]
    return out


@numba.njit(parallel=True, nogil=True, cache=True)
def _resized_crop(src, idx, boxes, oh, ow, out):
    h, w, c = src.shape[1], src.shape[2], src.shape[3]
    for b in prange(idx.shape[0]):
        s = idx[b]
        top, left, bh, bw = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
        for i in range(oh):
            yy = min(max(top + (i + 0.5) * bh / oh - 0.5, 0.0), h - 1.0)
            y0 = int(np.floor(yy))
            y1 = min(y0 + 1, h - 1)
            wy = yy - y0
            for j in range(ow):
                xx = min(max(left + (j + 0.5) * bw / ow - 0.5, 0.0), w - 1.0)
                x0 = int(np.floor(xx))
                x1 = min(x0 + 1, w - 1)
                wx = xx - x0
                for ch in range(c):
                    t = src[s, y0, x0, ch] * (1 - wx) + src[s, y0, x1, ch] * wx
                    u = src[s, y1, x0, ch] * (1 - wx) + src[s, y1, x1, ch] * wx
                    v = np.floor(t * (1 - wy) + u * wy + 0.5)
                    out[b, i, j, ch] = min(max(v, 0.0), 255.0)
    return out


# ------------------------------------------------------------------ pipeline


class Pipeline:
    def __init__(self, ops: list[Op]):
        names = [type(o).__name__ for o in ops]
        unknown = [n for n in names if n not in ORDER]
        if unknown:
            raise ValueError(f"unknown transform(s) {unknown}; known: {list(ORDER)}")
        if len(set(names)) != len(names):
            raise ValueError(f"each transform may appear once, got {names}")
        if names != sorted(names, key=ORDER.index):
            raise ValueError(f"transforms run in the order {[n for n in ORDER if n in names]}; "
                             f"list them so (got {names})")
        self.ops = {type(o).__name__: o for o in ops}
        norm = self.ops.get("Normalize")
        dtype = self.ops.get("ToDtype", ToDtype("float32" if norm else "uint8")).dtype
        if dtype not in ("float32", "float16", "uint8"):
            raise ValueError(f"ToDtype: unsupported dtype {dtype!r}")
        if dtype == "uint8" and norm is not None:
            raise ValueError("ToDtype('uint8') cannot follow Normalize")
        self.dtype = np.dtype(dtype)
        self.channels_last = "ChannelsLast" in self.ops
        self._luts: dict[int, np.ndarray] = {}

    def output_shape(self, in_shape: tuple) -> tuple:
        h, w, c = in_shape
        if "RandomResizedCrop" in self.ops:
            h, w = self.ops["RandomResizedCrop"].size
        return (h, w, c) if self.channels_last else (c, h, w)

    def draw(self, rng: np.random.Generator, batch: int, in_shape: tuple) -> dict:
        params = {}
        shape = in_shape
        for name, op in self.ops.items():
            params.update(op.draw(rng, batch, shape))
            if name == "RandomResizedCrop":
                shape = (*op.size, in_shape[2])
        return params

    def _lut(self, channels: int) -> np.ndarray:
        if channels not in self._luts:
            norm = self.ops.get("Normalize")
            table = _lut(norm.mean if norm else None, norm.std if norm else None, channels, np.float32)
            if self.dtype == np.float16:
                table = table.astype(np.float16).view(np.uint16)
            elif self.dtype == np.uint8:
                table = table.astype(np.uint8)
            self._luts[channels] = np.ascontiguousarray(table)
        return self._luts[channels]

    def _geometry(self, params, n):
        z = np.zeros(n, np.int64)
        flip = params.get("flip", np.zeros(n, np.bool_))
        cut = self.ops["Cutout"].size if "Cutout" in self.ops else 0
        fill_t = self.ops["RandomTranslate"].fill if "RandomTranslate" in self.ops else 0
        fill_c = self.ops["Cutout"].fill if "Cutout" in self.ops else 0
        if "RandomTranslate" in self.ops and "Cutout" in self.ops and fill_t != fill_c:
            raise ValueError("RandomTranslate and Cutout must use the same fill value")
        return (np.asarray(flip, np.bool_), np.asarray(params.get("ty", z), np.int64),
                np.asarray(params.get("tx", z), np.int64), np.asarray(params.get("cy", z), np.int64),
                np.asarray(params.get("cx", z), np.int64), cut, fill_t if "RandomTranslate" in self.ops else fill_c)

    def __call__(self, src: np.ndarray, idx: np.ndarray, params: dict, out: np.ndarray | None = None,
                 scratch: np.ndarray | None = None) -> np.ndarray:
        """Transform images ``src[idx]`` (src: uint8 N x H x W x C, e.g. a memory map)."""
        idx = np.ascontiguousarray(idx, np.int64)
        n = len(idx)
        if "RandomResizedCrop" in self.ops:
            oh, ow = self.ops["RandomResizedCrop"].size
            if scratch is None or scratch.shape != (n, oh, ow, src.shape[3]):
                scratch = np.empty((n, oh, ow, src.shape[3]), np.uint8)
            src = _resized_crop(src, idx, params["box"], oh, ow, scratch)
            idx = np.arange(n, dtype=np.int64)
        shape = (n, *self.output_shape(src.shape[1:]))
        if out is None:
            out = np.empty(shape, self.dtype)
        elif out.shape != shape or out.dtype != self.dtype:
            raise ValueError(f"output buffer is {out.dtype}{list(out.shape)}, needs {self.dtype}{list(shape)}")
        view = out.view(np.uint16) if self.dtype == np.float16 else out
        if not self.channels_last:
            view = view.transpose(0, 2, 3, 1)     # write C x H x W memory through [b, y, x, c] indices
        _fused(src, idx, self._lut(src.shape[3]), *self._geometry(params, n), view)
        return out

    def reference(self, src: np.ndarray, idx: np.ndarray, params: dict) -> np.ndarray:
        """The ops one image at a time, in plain NumPy."""
        outs = []
        for b, i in enumerate(np.asarray(idx)):
            img = np.asarray(src[i])
            if "RandomResizedCrop" in self.ops:
                img = RandomResizedCrop.reference(img, params["box"][b], self.ops["RandomResizedCrop"].size)
            if "RandomHorizontalFlip" in self.ops:
                img = RandomHorizontalFlip.reference(img, params["flip"][b])
            if "RandomTranslate" in self.ops:
                t = self.ops["RandomTranslate"]
                img = RandomTranslate.reference(img, int(params["ty"][b]), int(params["tx"][b]), t.fill)
            if "Cutout" in self.ops:
                c = self.ops["Cutout"]
                img = Cutout.reference(img, int(params["cy"][b]), int(params["cx"][b]), c.size, c.fill)
            if "Normalize" in self.ops:
                nrm = self.ops["Normalize"]
                x = (img.astype(np.float32) / np.float32(255) - np.asarray(nrm.mean, np.float32)) \
                    / np.asarray(nrm.std, np.float32)
            else:
                x = img.astype(np.float32)
            x = x.astype(self.dtype)
            outs.append(x if self.channels_last else np.transpose(x, (2, 0, 1)))
        return np.stack(outs)
