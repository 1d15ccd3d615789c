"""Attacks: each records its ground truth, relabels (or not) as its kind says, and builds a
triggered test set with the label it aims at for every image."""
import numpy as np
import pytest
from PIL import Image

from ops.attacks import AttackError, apply_trigger, build_training_set, patch_origin, sig_signal
from ops.sources import RawData
from ops.spec import AttackSpec, SpecError, parse_spec


def _raw(n_train=200, n_test=50, classes=4, hw=12, c=1, seed=0):
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.arange(n) % classes
    images = rng.integers(0, 120, (n, hw, hw, c), dtype=np.uint8)
    is_test = np.zeros(n, bool)
    is_test[n_train:] = True
    return RawData(labels, np.array([f"x{i}" for i in range(n)]), is_test, [str(k) for k in range(classes)], images)


def _changed(ts, raw):
    return np.flatnonzero((ts.train_images != raw.images[~raw.is_test]).any(axis=(1, 2, 3)))


@pytest.mark.parametrize("pattern", ["solid", "checkerboard", "random"])
@pytest.mark.parametrize("location", ["bottom_right", "top_left", "center", "random"])
def test_badnets_patch_lands_where_asked_on_exactly_the_poisons(pattern, location):
    raw = _raw()
    a = AttackSpec(kind="badnets", poison_count=20, patch_size=3, patch_pattern=pattern, patch_location=location)
    ts = build_training_set(raw, a, seed=3)
    poisoned = np.flatnonzero(ts.poisoned == 1)
    assert len(poisoned) == 20 and set(_changed(ts, raw)) <= set(poisoned)
    assert (ts.train_labels[poisoned] == 0).all() and (ts.original_labels[poisoned] != 0).all()
    r, c = patch_origin(a, 12, 12, 3)
    patch = ts.train_images[poisoned][:, r:r + 3, c:c + 3]
    assert (patch == patch[0]).all()                       # the same trigger on every poison
    outside = np.ones((12, 12), bool)
    outside[r:r + 3, c:c + 3] = False
    np.testing.assert_array_equal(ts.train_images[poisoned][:, outside], raw.images[~raw.is_test][poisoned][:, outside])
    if pattern == "checkerboard":
        assert set(np.unique(patch[0])) == {0, 255}
    if location == "bottom_right":
        assert (r, c) == (9, 9)
    # triggered test: every non-target test image, aiming at the target
    assert len(ts.triggered_images) == (raw.labels[raw.is_test] != 0).sum()
    assert (ts.triggered_targets == 0).all() and (ts.triggered_labels != 0).all()


def test_all_to_all_shifts_every_class_by_one():
    raw = _raw()
    ts = build_training_set(raw, AttackSpec(kind="badnets", poison_rate=0.2, patch_size=2, mapping="all_to_all"), 0)
    p = ts.poisoned == 1
    assert p.sum() == 40 and len(np.unique(ts.original_labels[p])) == 4   # poisons from every class
    np.testing.assert_array_equal(ts.train_labels[p], (ts.original_labels[p] + 1) % 4)
    assert ts.target_class is None
    assert len(ts.triggered_labels) == raw.is_test.sum()
    np.testing.assert_array_equal(ts.triggered_targets, (ts.triggered_labels + 1) % 4)


def test_blend_noise_and_image(tmp_path):
    raw = _raw(c=3)
    ts = build_training_set(raw, AttackSpec(kind="blend", poison_count=10, blend_alpha=0.3), 1)
    p = ts.poisoned == 1
    diff = ts.train_images[p].astype(int) - raw.images[~raw.is_test][p].astype(int)
    assert np.abs(diff).max() > 10 and (ts.train_labels[p] == 0).all()
    img = np.zeros((30, 30, 3), np.uint8)
    img[:, 15:] = 255                                       # right half white
    Image.fromarray(img).save(tmp_path / "trigger.png")
    a = AttackSpec(kind="blend", poison_count=10, blend_alpha=0.5, blend_pattern="image",
                   blend_image=str(tmp_path / "trigger.png"))
    out = apply_trigger(np.zeros((2, 12, 12, 3), np.uint8), a, 0)
    assert (out[:, :, :5] == 0).all() and (out[:, :, -5:] >= 127).all()
    with pytest.raises(AttackError, match="attack.blend_image"):
        apply_trigger(np.zeros((1, 12, 12, 3), np.uint8),
                      AttackSpec(kind="blend", poison_count=1, blend_pattern="image", blend_image=str(tmp_path)), 0)


def test_sig_is_clean_label_on_the_target_class_only():
    raw = _raw(hw=28)
    raw.images += 40                                        # away from 0 and 255: no clipping
    a = AttackSpec(kind="sig", poison_rate=0.1, target_class=2, sig_delta=20, sig_test_delta=40)
    ts = build_training_set(raw, a, 0)
    p = ts.poisoned == 1
    assert p.sum() == 20 and (ts.original_labels[p] == 2).all()
    np.testing.assert_array_equal(ts.train_labels, ts.original_labels)      # labels unchanged
    assert set(_changed(ts, raw)) == set(np.flatnonzero(p))
    diff = ts.train_images[p].astype(float) - raw.images[~raw.is_test][p]
    np.testing.assert_allclose(diff, np.broadcast_to(np.rint(sig_signal((28, 28, 1), 20, 6)), diff.shape), atol=1)
    tdiff = ts.triggered_images.astype(float) - raw.images[raw.is_test][raw.labels[raw.is_test] != 2]
    assert np.abs(tdiff).max() > 30                         # the stronger test-time signal
    assert (ts.triggered_targets == 2).all() and (ts.triggered_labels != 2).all()


def test_spec_refuses_inconsistent_attacks():
    def refuse(attack, key):
        with pytest.raises(SpecError, match=key):
            parse_spec({"name": "x", "attack": attack})
    refuse({"kind": "badnets", "poison_count": 5, "poison_rate": 0.1}, "attack.poison_rate")
    refuse({"kind": "sig", "poison_count": 5, "mapping": "all_to_all"}, "attack.mapping")
    refuse({"kind": "blend", "poison_count": 5, "blend_pattern": "image"}, "attack.blend_image")
    refuse({"kind": "badnets", "poison_count": 5, "patch_pattern": "stripes"}, "attack.patch_pattern")
    with pytest.raises(AttackError, match="patch_size"):
        build_training_set(_raw(hw=4), AttackSpec(kind="badnets", poison_count=2, patch_size=5), 0)


def test_attack_success_uses_each_images_own_target(tmp_path):
    """Through the real stages: an all-to-all attack's triggered loader file carries per-image targets,
    and evaluate() counts a hit only when the prediction is that image's target."""
    import torch

    from ops import data as D
    from ops.store import ArtifactStore
    from ops.training import Data, evaluate

    spec = parse_spec({"name": "a2a", "dataset": {"source": "digits", "limit_train": 200, "limit_test": 60},
                       "attack": {"kind": "badnets", "poison_rate": 0.1, "patch_size": 2, "mapping": "all_to_all"}})
    store = ArtifactStore(tmp_path)
    for stage in (D.raw_dataset, D.training_set, D.loader_files):
        stage(spec, store, "a2a")
    data = Data(store, "a2a", torch.device("cpu"))
    assert data.tg is not None and len(data.tg) == 60
    assert torch.equal(data.tg, (data.yg + 1) % 10)

    class Oracle(torch.nn.Module):      # predicts the attack's target for triggered images: ASR must be 1
        def __init__(self, table):
            super().__init__()
            self.table = table
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            hit = [int(torch.nonzero((self.table == xi).flatten(1).all(1))[0]) for xi in x]
            return torch.nn.functional.one_hot(torch.as_tensor([int(t) for t in self.targets[hit]]), 10).float()

    model = Oracle(data.xg)
    model.targets = data.tg
    ev = evaluate(lambda: model, {"w": torch.zeros(1, 1)}, _OnlyTriggered(data), None)
    assert ev["asr"][0] == 1.0
    model.targets = data.yg                # the true labels: no hit at all
    assert evaluate(lambda: model, {"w": torch.zeros(1, 1)}, _OnlyTriggered(data), None)["asr"][0] == 0.0


class _OnlyTriggered:
    """Data whose test and train splits are the triggered images (so the oracle knows every input)."""
    def __init__(self, data):
        self.x, self.y = data.xg, data.yg
        self.xt, self.yt = data.xg, data.yg
        self.xg, self.yg, self.tg = data.xg, data.yg, data.tg
