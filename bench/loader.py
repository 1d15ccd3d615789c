"""Loader throughput: provenance's Loader vs FFCV's Loader vs torch's DataLoader + torchvision.

Same data, same pipeline, same batch size, one process, alternating A B C after a warm-up epoch
each; medians of whole-epoch images/s.

Data: Fashion-MNIST train (60,000 images; Debian's dataset-fashion-mnist, or synthetic images of
the same shape if it is not installed: the table says which) padded to 32x32 and repeated to
3 channels (CIFAR shape).  Pipeline: random horizontal flip, random translate (padding 2),
cutout 8x8, normalize to float32, NCHW logical layout (channels-last memory where the loader
offers it, as FFCV's ToTorchImage does).  Batch 512, random order, 2 worker threads/processes.

    python bench/loader.py            # 5 timed epochs per system
    python bench/loader.py --quick    # 10,000 images, 1 timed epoch

FFCV needs `apt-get install libturbojpeg0-dev libopencv-dev pkg-config` and `pip install ffcv
opencv-python-headless`; without it its rows say why and hold null.
"""
from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402

MEAN = (0.2860, 0.2860, 0.2860)
STD = (0.3530, 0.3530, 0.3530)
FASHION = Path("/usr/share/datasets/fashion-mnist")


def load_data(n: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    img_p, lab_p = FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz"
    if img_p.exists():
        images = np.frombuffer(gzip.open(img_p).read(), np.uint8, offset=16).reshape(-1, 28, 28)
        labels = np.frombuffer(gzip.open(lab_p).read(), np.uint8, offset=8).astype(np.int64)
        what = "fashion_mnist"
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, 60000)
        what = "synthetic 28x28 (dataset-fashion-mnist not installed)"
    if n:
        images, labels = images[:n], labels[:n]
    padded = np.zeros((len(images), 32, 32, 3), np.uint8)
    padded[:, 2:30, 2:30, :] = images[..., None]
    return padded, labels, what


def provenance_epoch_factory(path, bs, workers):
    from kernels.dataloader import Loader
    from kernels.transforms import ChannelsLast, Cutout, Normalize, Pipeline, RandomHorizontalFlip, RandomTranslate

    import numba

    numba.set_num_threads(workers)
    pipe = Pipeline([RandomHorizontalFlip(), RandomTranslate(2), Cutout(8), Normalize(MEAN, STD), ChannelsLast()])
    loader = Loader(path, bs, pipelines={"image": pipe}, order="random", seed=0)

    def epoch():
        return sum(b["image"].shape[0] for b in loader)
    return epoch


def ffcv_epoch_factory(images, labels, tmp, bs, workers):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Cutout, NormalizeImage, RandomHorizontalFlip, RandomTranslate, Squeeze, ToTensor, ToTorchImage
    from ffcv.writer import DatasetWriter

    class DS:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    path = os.path.join(tmp, "bench.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw", max_resolution=32), "label": IntField()},
                  num_workers=workers).from_indexed_dataset(DS())
    pipelines = {"image": [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=2),
                           Cutout(8, (0, 0, 0)), NormalizeImage(np.array(MEAN) * 255, np.array(STD) * 255, np.float32),
                           ToTensor(), ToTorchImage()],
                 "label": [IntDecoder(), ToTensor(), Squeeze()]}
    loader = Loader(path, batch_size=bs, num_workers=workers, order=OrderOption.RANDOM, pipelines=pipelines,
                    drop_last=False, seed=0)
    return _epoch_of(loader)


def _epoch_of(loader):
    """One full pass over a loader yielding (images, labels); returns the number of images."""
    def epoch():
        return sum(x.shape[0] for x, _ in loader)
    return epoch


class _TorchDS:
    def __init__(self, images, labels, tf):
        self.images, self.labels, self.tf = images, labels, tf

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        import torch

        return self.tf(torch.from_numpy(self.images[i]).permute(2, 0, 1)), int(self.labels[i])


def torch_epoch_factory(images, labels, bs, workers):
    import torch
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=2),
                     v2.RandomErasing(p=1.0, scale=(64 / 1024, 64 / 1024), ratio=(1.0, 1.0), value=0),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(_TorchDS(images, labels, tf), batch_size=bs, shuffle=True,
                                         num_workers=workers, persistent_workers=True)
    return _epoch_of(loader)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    images, labels, what = load_data(10_000 if args.quick else None)
    from kernels.loader import write_loader_file

    systems, notes = {}, {}
    with tempfile.TemporaryDirectory(prefix="provenance-loader-bench-") as tmp:
        path = write_loader_file(os.path.join(tmp, "bench.pvl"), {"image": images, "label": labels})
        systems["provenance"] = provenance_epoch_factory(path, args.batch_size, args.workers)
        try:
            systems["ffcv"] = ffcv_epoch_factory(images, labels, tmp, args.batch_size, args.workers)
        except ImportError as e:
            notes["ffcv"] = f"ffcv not importable: {e}"
        systems["torch_dataloader"] = torch_epoch_factory(images, labels, args.batch_size, args.workers)
        times = {k: [] for k in systems}
        for name, epoch in systems.items():          # warm-up: compile, page cache, worker start
            epoch()
        for _ in range(runs):                        # A B C, A B C, ...
            for name, epoch in systems.items():
                t0 = time.perf_counter()
                n = epoch()
                times[name].append(n / (time.perf_counter() - t0))
    case = "fmnist32-aug"
    med = {k: statistics.median(v) for k, v in times.items()}
    results = [{"case": case, "system": k, "metric": "img_per_s", "value": round(v, 1), "runs": runs}
               for k, v in med.items()]
    for k, why in notes.items():
        results.append({"case": case, "system": k, "metric": "img_per_s", "value": None, "runs": 0, "note": why})
    ratios = [{"case": case, "metric": "img_per_s", "of": "provenance", "over": peer,
               "value": round(med["provenance"] / med[peer], 2) if peer in med else None}
              for peer in ("ffcv", "torch_dataloader")]
    print(f"data: {what}, {len(images)} images 32x32x3, batch {args.batch_size}, {args.workers} workers, "
          f"flip + translate(2) + cutout(8) + normalize -> float32, median of {runs} epochs")
    print(f"{'system':<18}{'img/s':>14}   all runs")
    for k, v in med.items():
        print(f"{k:<18}{v:>14,.0f}   {', '.join(f'{x:,.0f}' for x in times[k])}")
    for k, why in notes.items():
        print(f"{k:<18}{'n/a':>14}   {why}")
    for r in ratios:
        print(f"ratio provenance / {r['over']}: {r['value']}")
    write_results("loader", {"dataset": what, "images": len(images), "batch_size": args.batch_size,
                      "workers": args.workers, "pipeline": "flip+translate(2)+cutout(8)+normalize->float32",
                      "order": "random"},
                  results, ratios, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
