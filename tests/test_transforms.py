import numpy as np
import pytest
import torch

from kernels.dataloader import torch_pipeline
from kernels.transforms import (ChannelsLast, Cutout, Normalize, Pipeline, RandomHorizontalFlip, RandomResizedCrop,
                                RandomTranslate, ToDtype)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SRC = np.random.default_rng(0).integers(0, 256, (300, 12, 10, 3), dtype=np.uint8)

PIPELINES = {
    "flip": [RandomHorizontalFlip(p=0.5)],
    "translate": [RandomTranslate(3, fill=7)],
    "cutout": [Cutout(5, fill=9)],
    "normalize-f32-nchw": [Normalize(MEAN, STD)],
    "normalize-f16-nhwc": [Normalize(MEAN, STD), ToDtype("float16"), ChannelsLast()],
    "cifar": [RandomHorizontalFlip(), RandomTranslate(2), Cutout(4), Normalize(MEAN, STD), ChannelsLast()],
    "resized-crop": [RandomResizedCrop((8, 8)), RandomHorizontalFlip(), Normalize(MEAN, STD)],
    "uint8-nchw": [RandomHorizontalFlip(), RandomTranslate(1)],
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_fused_kernel_equals_reference_on_the_same_draws(name):
    pipe = Pipeline(PIPELINES[name])
    idx = np.random.default_rng(1).integers(0, 300, 64)
    params = pipe.draw(np.random.default_rng(2), 64, SRC.shape[1:])
    fast = pipe(SRC, idx, params)
    ref = pipe.reference(SRC, idx, params)
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("name", ["flip", "translate", "cutout", "normalize-f32-nchw", "normalize-f16-nhwc", "cifar"])
def test_resident_torch_version_equals_reference(name):
    pipe = Pipeline(PIPELINES[name])
    idx = np.random.default_rng(3).integers(0, 300, 32)
    params = pipe.draw(np.random.default_rng(4), 32, SRC.shape[1:])
    out = torch_pipeline(pipe, torch.from_numpy(SRC), torch.from_numpy(idx), params)
    np.testing.assert_array_equal(out.numpy(), pipe.reference(SRC, idx, params))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tx", [10, 13, -13])
def test_translation_by_a_whole_width_or_more_stays_inside_the_output(channels_last, tx):
    """A shift of the whole width (or more) leaves a row of fill; nothing is written past it."""
    pipe = Pipeline([RandomTranslate(14, fill=3), *([ChannelsLast()] if channels_last else [])])
    n = 4
    idx = np.arange(n)
    params = {"ty": np.zeros(n, np.int64), "tx": np.full(n, tx, np.int64)}
    shape = (n, *pipe.output_shape(SRC.shape[1:]))
    buf = np.full((n + 1, *shape[1:]), 77, np.uint8)      # one guard image after the output
    out = pipe(SRC, idx, params, out=buf[:n])
    np.testing.assert_array_equal(out, pipe.reference(SRC, idx, params))
    assert (out == 3).all() and (buf[n] == 77).all()


def test_reference_ops_do_what_they_say():
    img = np.arange(4 * 5 * 1, dtype=np.uint8).reshape(4, 5, 1)
    np.testing.assert_array_equal(RandomHorizontalFlip.reference(img, True)[:, 0], img[:, -1])
    moved = RandomTranslate.reference(img, 1, -2, 0)
    np.testing.assert_array_equal(moved[1:, :3], img[:3, 2:])
    assert (moved[0] == 0).all() and (moved[:, 3:] == 0).all()
    cut = Cutout.reference(np.full((10, 10, 1), 5, np.uint8), 5, 5, 4, 0)
    assert (cut == 0).sum() == 16 and (cut[3:7, 3:7] == 0).all()
    edge = Cutout.reference(np.full((10, 10, 1), 5, np.uint8), 0, 0, 4, 0)
    assert (edge == 0).sum() == 4      # clipped to the image
    whole = RandomResizedCrop.reference(img, (0, 0, 4, 5), (4, 5))
    np.testing.assert_array_equal(whole, img)


def test_draws_are_seeded_and_within_bounds():
    pipe = Pipeline(PIPELINES["cifar"])
    a = pipe.draw(np.random.default_rng(5), 100, (32, 32, 3))
    b = pipe.draw(np.random.default_rng(5), 100, (32, 32, 3))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["ty"].min() >= -2 and a["ty"].max() <= 2 and 0.3 < a["flip"].mean() < 0.7


def test_pipeline_validation():
    with pytest.raises(ValueError, match="list them so"):
        Pipeline([Cutout(4), RandomHorizontalFlip()])
    with pytest.raises(ValueError, match="once"):
        Pipeline([RandomHorizontalFlip(), RandomHorizontalFlip()])
    with pytest.raises(ValueError, match="cannot follow Normalize"):
        Pipeline([Normalize(MEAN, STD), ToDtype("uint8")])
    with pytest.raises(ValueError, match="same fill"):
        Pipeline([RandomTranslate(2, fill=1), Cutout(3, fill=2)])(SRC, np.arange(2), {"ty": np.zeros(2, int),
                                                                                    "tx": np.zeros(2, int),
                                                                                    "cy": np.zeros(2, int),
                                                                                    "cx": np.zeros(2, int)})
    pipe = Pipeline(PIPELINES["cifar"])
    with pytest.raises(ValueError, match="output buffer"):
        pipe(SRC, np.arange(4), pipe.draw(np.random.default_rng(0), 4, SRC.shape[1:]), out=np.zeros((4, 3, 12, 10), np.float32))
