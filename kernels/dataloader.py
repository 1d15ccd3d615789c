"""The Loader: batches from a loader file, transformed and prefetched on a background thread.

    loader = Loader("train.pvl", batch_size=512, order="random", seed=0,
                    pipelines={"image": Pipeline([RandomHorizontalFlip(), RandomTranslate(2),
                                                  Cutout(8), Normalize(mean, std), ChannelsLast()])})
    for epoch in range(epochs):
        for batch in loader:          # {"image": tensor, "label": tensor}; a new seeded order per epoch
            ...

- orders: ``sequential``, ``random`` (a permutation seeded by (seed, epoch)), ``quasi_random``
  (pages of consecutive examples in random order, shuffled within a window of two pages: reads
  stay local in the file);
- ``indices``: train on a subset (a row of subset_masks), ``drop_last``;
- distributed: ``rank``/``world_size`` split every epoch's order into disjoint, equal shards (the
  order is padded by wrapping around, as torch's DistributedSampler does);
- ``batches_ahead`` batches are prepared ahead by one producer thread into reused buffers; with a
  CUDA ``device`` the buffers are pinned and copied with ``non_blocking=True``;
- ``resident=True`` moves the fields to the device once and transforms batches there with torch
  (the fastest way to feed small datasets, as the fastest CIFAR-10 trainers do).

A batch's CPU tensors are views of a buffer that is refilled after the next batch is drawn:
clone them to keep them longer.  An iterator abandoned mid-epoch stops its thread and frees its
buffers when it is garbage-collected (or at once with ``close()``).
"""
from __future__ import annotations

import queue
import threading
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kernels.loader import LoaderFile
from kernels.transforms import Pipeline

ORDERS = ("sequential", "random", "quasi_random")


def epoch_order(n: int, order: str, seed: int, epoch: int, indices: np.ndarray | None = None,
                page_rows: int = 1024, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The example indices one rank reads in one epoch."""
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    rng = np.random.default_rng([seed, epoch])
    if order == "random":
        idx = idx[rng.permutation(len(idx))]
    elif order == "quasi_random":
        idx = np.sort(idx)
        pages = idx // max(1, page_rows)
        starts = np.flatnonzero(np.r_[True, pages[1:] != pages[:-1]])
        groups = np.split(idx, starts[1:])
        groups = [groups[i] for i in rng.permutation(len(groups))]
        out = []
        for i in range(0, len(groups), 2):   # shuffle within a window of two pages
            window = np.concatenate(groups[i:i + 2])
            out.append(window[rng.permutation(len(window))])
        idx = np.concatenate(out) if out else idx
    elif order != "sequential":
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    if world_size > 1:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        total = -(-len(idx) // world_size) * world_size
        idx = np.resize(idx, total)[rank::world_size]
    return idx


class Loader:
    def __init__(self, source: LoaderFile | str | Path, batch_size: int, *, pipelines: dict | None = None,
                 fields: tuple[str, ...] | None = None, order: str = "random", indices=None,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batches_ahead: int = 2, device: str | torch.device = "cpu", resident: bool = False,
                 page_bytes: int = 8 << 20):
        self.file = source if isinstance(source, LoaderFile) else LoaderFile(source)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
        self.fields = tuple(fields or self.file.fields)
        self.shapes = {f: field_shape(self.file, f, f in (pipelines or {})) for f in self.fields}
        self.pipelines = dict(pipelines or {})
        for f in self.pipelines:
            if f not in self.fields:
                raise ValueError(f"pipeline for {f!r}, which is not a loaded field {self.fields}")
        self.batch_size, self.order, self.drop_last, self.seed = batch_size, order, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.indices = None if indices is None else np.asarray(indices, np.int64)
        if self.indices is not None and self.indices.size and (
                self.indices.min() < 0 or self.indices.max() >= len(self.file)):
            bad = self.indices[(self.indices < 0) | (self.indices >= len(self.file))][0]
            raise IndexError(f"{self.file.path}: index {bad} out of range [0, {len(self.file)})")
        self.batches_ahead = max(1, batches_ahead)
        self.device = torch.device(device)
        self.resident = resident
        row = max(1, sum(self.file.fields[f].nbytes for f in self.fields) // max(1, len(self.file)))
        self.page_rows = max(1, page_bytes // row)
        self._epoch = 0
        self._resident_data: dict[str, torch.Tensor] | None = None

    def order_for(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.file), self.order, self.seed, epoch, self.indices, self.page_rows,
                           self.rank, self.world_size)

    def __len__(self) -> int:
        n = len(self.order_for(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        order = self.order_for(epoch)
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __iter__(self) -> Iterator[dict]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        return self.iterate(epoch)

    def iterate(self, epoch: int) -> Iterator[dict]:
        if self.resident:
            return self._resident_iter(epoch)
        return _EpochIterator(self, epoch)

    # ---------------------------------------------------------------- resident mode

    def _resident(self) -> dict[str, torch.Tensor]:
        if self._resident_data is None:
            for f in self.fields:
                if self.file.fields[f].kind != "fixed":
                    raise ValueError(f"resident mode needs fixed-size fields; {f!r} holds encoded bytes")
            self._resident_data = {f: torch.from_numpy(np.array(self.file.array(f))).to(self.device)
                                   for f in self.fields}
        return self._resident_data

    def fetch(self, idx, params: dict | None = None) -> dict:
        """Transform examples ``idx`` (any shape) on the device, from the resident copy.

        ``params``: {field: draws of its Pipeline}; a field without draws gets none (no flip,
        no shift, no cutout), which makes ``fetch`` the plain normalize/convert of a split."""
        data = self._resident()
        idx_t = torch.as_tensor(idx, device=self.device, dtype=torch.long)
        out = {}
        for f in self.fields:
            pipe = self.pipelines.get(f)
            if pipe is None:
                out[f] = data[f][idx_t]
            else:
                flat = idx_t.reshape(-1)
                res = torch_pipeline(pipe, data[f], flat, (params or {}).get(f, {}))
                if pipe.channels_last and res.ndim == 4:
                    res = res.permute(0, 3, 1, 2)      # NCHW view over NHWC memory, as the threaded path
                out[f] = res if idx_t.ndim == 1 else res.reshape(*idx_t.shape, *res.shape[1:])
        return out

    def _resident_iter(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        for idx in self._batches(epoch):
            params = {f: p.draw(rng, len(idx), self.shapes[f]) for f, p in self.pipelines.items()}
            yield self.fetch(idx, params)


def source_coords(h: int, w: int, flip, ty, tx, cy, cx, cut: int):
    """Where each output pixel of a flipped, translated, cut-out image comes from, in torch.

    Inputs are [n] tensors of draws; returns (sy, sx, ok), each [n, h, w]: source row and
    column (clamped into the image) and whether the pixel is read (False: fill value).  The
    semantics are those of kernels/transforms.py."""
    dev = ty.device
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    sy, sx = ys - ty[:, None, None], xs - tx[:, None, None]
    ok = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    if cut:
        ly, lx = (cy - cut // 2)[:, None, None], (cx - cut // 2)[:, None, None]
        ok &= ~((ys >= ly) & (ys < ly + cut) & (xs >= lx) & (xs < lx + cut))
    sx = torch.where(flip[:, None, None], w - 1 - sx, sx)
    return sy.clamp(0, h - 1), sx.clamp(0, w - 1), ok


def torch_pipeline(pipe: Pipeline, data: torch.Tensor, idx: torch.Tensor, params: dict) -> torch.Tensor:
    """The fused pipeline in torch, for data resident on a device (no RandomResizedCrop).

    Returns N x H x W x C with ChannelsLast, else N x C x H x W (contiguous)."""
    if "RandomResizedCrop" in pipe.ops:
        raise NotImplementedError("RandomResizedCrop runs in the CPU loader only; use resident=False")
    dev = data.device
    n = len(idx)
    _, h, w, c = data.shape
    flip, ty, tx, cy, cx, cut, fill = pipe._geometry(params, n)
    sy, sx, ok = source_coords(h, w, *(torch.as_tensor(a, device=dev) for a in (flip, ty, tx, cy, cx)), cut)
    v = data[idx[:, None, None], sy, sx].long()      # n, h, w, c
    v = torch.where(ok[..., None], v, torch.full_like(v, fill))
    lut = torch.from_numpy(pipe._lut(c).view(np.float16) if pipe.dtype == np.float16 else pipe._lut(c)).to(dev)
    out = lut[v, torch.arange(c, device=dev)]
    return out if pipe.channels_last else out.permute(0, 3, 1, 2).contiguous()


def field_shape(file: LoaderFile, name: str, decoded: bool) -> tuple:
    """Per-example shape a field yields: fixed fields their own; encoded images the shape in the
    file's ``decoded_shape`` attribute (set by the writer), which every image must decode to."""
    info = file.fields.get(name)
    if info is None:
        raise ValueError(f"{file.path}: no field {name!r} (fields: {sorted(file.fields)})")
    if info.kind == "fixed":
        return info.shape
    if not decoded:
        raise ValueError(f"{file.path}: field {name!r} holds encoded bytes; give it a Pipeline to decode it")
    shape = file.attrs.get("decoded_shape", {}).get(name)
    if not shape:
        raise ValueError(f"{file.path}: bytes field {name!r} has no decoded_shape attribute")
    return tuple(shape)


def decode_into(blobs: list[bytes], out: np.ndarray, pool) -> np.ndarray:
    """Decode encoded images (PNG/JPEG/...) into ``out`` [n, H, W, C] uint8, on a thread pool."""
    import io

    from PIL import Image

    h, w, c = out.shape[1:]

    def one(i):
        img = Image.open(io.BytesIO(blobs[i])).convert("L" if c == 1 else "RGB")
        a = np.asarray(img, np.uint8)
        if a.shape[:2] != (h, w):
            raise ValueError(f"an image decodes to {a.shape[1]}x{a.shape[0]}, the file declares {w}x{h}")
        out[i] = a.reshape(h, w, c)

    list(pool.map(one, range(len(blobs))))
    return out


def _produce(file: LoaderFile, fields, shapes, pipelines, batches, seed, epoch, slots, free_q, ready_q, stop):
    from concurrent.futures import ThreadPoolExecutor

    arrays = {f: file.array(f) for f in fields if file.fields[f].kind == "fixed"}
    pool = ThreadPoolExecutor(2) if len(arrays) < len(fields) else None
    scratch = {}
    rng = np.random.default_rng([seed, epoch])     # one stream per epoch, drawn batch after batch
    try:
        for b, idx in enumerate(batches):
            while True:
                if stop.is_set():
                    return
                try:
                    k = free_q.get(timeout=0.1)
                    break
                except queue.Empty:
                    continue
            n = len(idx)
            views = {}
            for f in fields:
                buf = slots[k][f]
                pipe = pipelines.get(f)
                src, sel = arrays.get(f), idx
                if src is None:   # encoded images: decode the batch, then transform it
                    if f not in scratch or len(scratch[f]) < n:
                        scratch[f] = np.empty((len(idx), *shapes[f]), np.uint8)
                    src = decode_into(file.take_bytes(f, idx), scratch[f][:n], pool)
                    sel = np.arange(n)
                if pipe is None:
                    np.take(src, sel, axis=0, out=buf[:n])
                else:
                    pipe(src, sel, pipe.draw(rng, n, shapes[f]), out=buf[:n])
                views[f] = buf[:n]
            ready_q.put((k, views))
    except BaseException as e:  # hand the error to the consumer
        ready_q.put((None, e))
        return
    finally:
        if pool is not None:
            pool.shutdown(wait=False)
    ready_q.put((None, None))


def _shutdown(stop: threading.Event, thread: threading.Thread):
    stop.set()
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=5)


class _EpochIterator:
    def __init__(self, loader: Loader, epoch: int):
        self.batches = loader._batches(epoch)
        self.device = loader.device
        cuda = self.device.type == "cuda"
        n_slots = loader.batches_ahead + 2
        f0 = loader.file
        self.slots = []
        for _ in range(n_slots):
            slot = {}
            for f in loader.fields:
                pipe = loader.pipelines.get(f)
                info = f0.fields[f]
                shape = pipe.output_shape(loader.shapes[f]) if pipe else info.shape
                dtype = pipe.dtype if pipe else info.dtype
                t = torch.empty((loader.batch_size, *shape), dtype=_torch_dtype(dtype), pin_memory=cuda)
                slot[f] = t.numpy()
            self.slots.append(slot)
        self.free_q: queue.Queue = queue.Queue()
        self.ready_q: queue.Queue = queue.Queue()
        for k in range(n_slots):
            self.free_q.put(k)
        self._held: int | None = None
        self._events: dict[int, torch.cuda.Event] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=_produce, daemon=True, name="provenance-loader",
            args=(f0, loader.fields, loader.shapes, loader.pipelines, self.batches, loader.seed, epoch, self.slots,
                  self.free_q, self.ready_q, self.stop))
        self.thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self.stop, self.thread)
        self.channels_last = {f: p.channels_last for f, p in loader.pipelines.items()}
        self._done = False

    def __iter__(self):
        return self

    def __len__(self):
        return len(self.batches)

    def _release(self):
        if self._held is not None:
            ev = self._events.pop(self._held, None)
            if ev is not None:
                ev.synchronize()
            self.free_q.put(self._held)
            self._held = None

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        self._release()
        k, views = self.ready_q.get()
        if k is None:
            self._done = True
            self.close()
            if isinstance(views, BaseException):
                raise views
            raise StopIteration
        self._held = k
        out = {}
        for f, arr in views.items():
            t = torch.from_numpy(arr)
            if self.channels_last.get(f) and t.ndim == 4:
                t = t.permute(0, 3, 1, 2)      # NCHW view over NHWC memory (channels_last format)
            if self.device.type == "cuda":
                t = t.to(self.device, non_blocking=True)
            out[f] = t
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            self._events[k] = ev
        return out

    def close(self):
        """Stop the producer; the iterator is then exhausted (batches already made are dropped)."""
        self._done = True
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _torch_dtype(dtype) -> torch.dtype:
    return {np.dtype(np.uint8): torch.uint8, np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32,
            np.dtype(np.float16): torch.float16, np.dtype(np.int32): torch.int32,
            np.dtype(np.float64): torch.float64, np.dtype(np.bool_): torch.bool,
            np.dtype(np.int16): torch.int16}[np.dtype(dtype)]
