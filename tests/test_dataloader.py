import gc
import io
import threading
import time

import numpy as np
import pytest
import torch

from kernels.dataloader import Loader, epoch_order
from kernels.loader import write_loader_file
from kernels.transforms import ChannelsLast, Cutout, Normalize, Pipeline, RandomHorizontalFlip, RandomTranslate

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (500, 8, 8, 3), dtype=np.uint8)
LABELS = np.arange(500, dtype=np.int64)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_loader_file(tmp_path_factory.mktemp("dl") / "d.pvl", {"image": IMAGES, "label": LABELS})


def _pipe():
    return Pipeline([RandomHorizontalFlip(), RandomTranslate(2), Cutout(3), Normalize((0.5,) * 3, (0.25,) * 3),
                     ChannelsLast()])


@pytest.mark.parametrize("order", ["sequential", "random", "quasi_random"])
def test_every_order_reads_each_subset_example_once(path, order):
    subset = np.arange(3, 500, 4)
    loader = Loader(path, 32, order=order, indices=subset, seed=1, pipelines={"image": _pipe()}, page_bytes=64 * 192)
    seen = np.concatenate([b["label"].numpy().copy() for b in loader])
    assert sorted(seen.tolist()) == subset.tolist()
    if order == "sequential":
        assert seen.tolist() == subset.tolist()


def test_epochs_are_seeded_and_differ(path):
    a = Loader(path, 50, order="random", seed=3)
    b = Loader(path, 50, order="random", seed=3)
    e0 = [x["label"].clone() for x in a]
    assert all(torch.equal(x, y["label"]) for x, y in zip(e0, b))
    e1 = [x["label"].clone() for x in a]          # the next epoch: a new order
    assert not all(torch.equal(x, y) for x, y in zip(e0, e1))
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x in e1]), a.order_for(1))


def test_quasi_random_stays_within_two_pages_at_a_time():
    order = epoch_order(1000, "quasi_random", 0, 0, page_rows=100)
    assert sorted(order.tolist()) == list(range(1000))
    for start in range(0, 1000, 200):
        assert len(set((order[start:start + 200] // 100).tolist())) <= 2
    assert not np.array_equal(order, np.arange(1000))


def test_batches_are_the_pipeline_applied_to_the_order(path):
    pipe = _pipe()
    loader = Loader(path, 64, order="random", seed=5, pipelines={"image": pipe})
    it = loader.iterate(2)
    order = loader.order_for(2)
    rng = np.random.default_rng([5, 2])
    for b in range(3):
        batch = next(it)
        idx = order[b * 64:(b + 1) * 64]
        expect = pipe.reference(IMAGES, idx, pipe.draw(rng, len(idx), IMAGES.shape[1:]))
        got = batch["image"]
        assert got.shape == (64, 3, 8, 8) and got.is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), expect)
        np.testing.assert_array_equal(batch["label"].numpy(), idx)
    it.close()
    rest = []                      # closed: exhausted at once, not waiting on a stopped producer
    t = threading.Thread(target=lambda: rest.append(list(it)), daemon=True)
    t.start()
    t.join(10)
    assert rest == [[]]


def test_resident_mode_gives_the_same_batches(path):
    kw = dict(order="random", seed=9, pipelines={"image": _pipe()})
    threaded = [{k: v.clone() for k, v in b.items()} for b in Loader(path, 100, **kw)]
    resident = list(Loader(path, 100, resident=True, **kw))
    assert len(threaded) == len(resident) == 5
    for a, b in zip(threaded, resident):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        assert torch.equal(a["label"], b["label"])


def test_drop_last_and_distributed_shards(path):
    assert len(Loader(path, 64, drop_last=True)) == 7 and len(Loader(path, 64)) == 8
    shards = [Loader(path, 16, order="random", seed=2, rank=r, world_size=3).order_for(0) for r in range(3)]
    assert {len(s) for s in shards} == {167}
    union = np.concatenate(shards)
    assert set(union.tolist()) == set(range(500)) and len(union) == 501   # padded by wrapping
    with pytest.raises(ValueError, match="rank 3"):
        Loader(path, 16, rank=3, world_size=3).order_for(0)


def test_abandoned_iterators_leak_no_threads_or_memory(path):
    import tracemalloc

    loader = Loader(path, 32, pipelines={"image": _pipe()}, batches_ahead=3)
    base = threading.active_count()
    for _ in range(3):                       # warm-up (compilation, caches)
        it = iter(loader)
        next(it)
        del it
    gc.collect()
    tracemalloc.start()
    first = None
    for i in range(40):
        it = iter(loader)
        next(it)
        next(it)
        del it                               # abandoned mid-epoch
        if i == 4:
            gc.collect()
            first = tracemalloc.get_traced_memory()[0]
    gc.collect()
    time.sleep(0.3)
    grown = tracemalloc.get_traced_memory()[0] - first
    tracemalloc.stop()
    assert threading.active_count() == base
    assert grown < 2 << 20, f"memory grew by {grown} bytes over 35 abandoned iterators"
    with iter(loader) as it:                 # explicit close
        next(it)
    assert threading.active_count() == base


def test_errors_in_the_producer_reach_the_consumer(path):
    class Broken(Pipeline):
        def __call__(self, *a, **k):
            raise RuntimeError("boom in the pipeline")

    loader = Loader(path, 32, pipelines={"image": Broken([RandomHorizontalFlip()])})
    with pytest.raises(RuntimeError, match="boom"):
        list(loader)


def test_bad_arguments(path):
    with pytest.raises(IndexError, match="index 500 out of range"):
        Loader(path, 8, indices=[0, 500])
    with pytest.raises(ValueError, match="no field 'nope'"):
        Loader(path, 8, fields=("nope",))
    with pytest.raises(ValueError, match="unknown order"):
        Loader(path, 8, order="shuffled")
    with pytest.raises(ValueError, match="batch_size"):
        Loader(path, 0)


def test_encoded_images_are_decoded_then_transformed(tmp_path):
    from PIL import Image

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    p = write_loader_file(tmp_path / "png.pvl", {"image": [png(a) for a in IMAGES[:40]], "label": LABELS[:40]},
                          attrs={"decoded_shape": {"image": [8, 8, 3]}})
    pipe = _pipe()
    raw = [b["image"].clone() for b in Loader(write_loader_file(tmp_path / "raw.pvl", {"image": IMAGES[:40],
                                                                                       "label": LABELS[:40]}),
                                              16, seed=4, pipelines={"image": pipe})]
    enc = [b["image"].clone() for b in Loader(p, 16, seed=4, pipelines={"image": pipe})]
    assert len(raw) == len(enc) == 3 and all(torch.equal(a, b) for a, b in zip(raw, enc))
    with pytest.raises(ValueError, match="give it a Pipeline"):
        Loader(p, 16)
