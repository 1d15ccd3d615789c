"""Poisoning attacks applied to the training split, with the ground truth kept.

Every attack poisons a seeded choice of training examples, records which ones in ``poisoned``,
and produces a triggered copy of the test examples it aims at, with the label the attack wants
for each (``triggered_targets``): the share of them classified as that label is the attack
success rate.

- ``badnets`` (Gu et al. 2017): a patch of ``patch_size`` pixels at ``patch_location``; its
  ``patch_pattern`` is solid (``patch_value``), a checkerboard of 0 / ``patch_value``, or a seeded
  random 0/255 pattern.  Dirty-label: the label becomes the target.
- ``blend`` (Chen et al. 2017): ``(1 - α)·x + α·pattern`` with a seeded random-noise pattern or an
  image file (``blend_image``) resized to the dataset's images.  Dirty-label.
- ``sig`` (Barni, Kallas & Tondi 2019, the sinusoidal-signal attack): a horizontal sinusoid of
  amplitude ``sig_delta`` (pixel values) and ``sig_frequency`` periods across the width is added
  to target-class training images only, labels unchanged (clean-label); at test time the signal
  (amplitude ``sig_test_delta``, the training amplitude when unset) is added to the images of the
  other classes.

``mapping``: ``all_to_one`` (every poison and triggered test image aims at ``target_class``) or
``all_to_all`` (an example of class y aims at (y + 1) mod C; poisons come from every class).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.sources import RawData


@dataclass
class TrainingSet:
    train_images: np.ndarray
    train_labels: np.ndarray
    train_ids: np.ndarray
    original_labels: np.ndarray
    poisoned: np.ndarray           # int8: 1 poisoned, 0 clean, -1 unknown
    test_images: np.ndarray
    test_labels: np.ndarray
    test_ids: np.ndarray
    triggered_images: np.ndarray   # empty when no attack was applied
    triggered_labels: np.ndarray   # the true (pre-trigger) labels
    triggered_ids: np.ndarray
    target_class: int | None       # None for all-to-all attacks (see triggered_targets)
    classes: list[str]
    triggered_targets: np.ndarray = None   # the label the attack wants for each triggered image

    def __post_init__(self):
        if self.triggered_targets is None:
            self.triggered_targets = np.zeros(0, np.int64)


class AttackError(ValueError):
    """The attack cannot be applied to this data; the message names the spec key."""


def _patch(attack, channels: int, seed: int) -> np.ndarray:
    p, v = attack.patch_size, attack.patch_value
    if attack.patch_pattern == "solid":
        return np.full((p, p, channels), v, np.uint8)
    if attack.patch_pattern == "checkerboard":
        board = (np.add.outer(np.arange(p), np.arange(p)) % 2 == 0).astype(np.uint8) * v
        return np.repeat(board[:, :, None], channels, axis=2)
    rng = np.random.default_rng([seed, 29])
    return (rng.integers(0, 2, (p, p, channels)) * 255).astype(np.uint8)


def patch_origin(attack, h: int, w: int, seed: int) -> tuple[int, int]:
    p = attack.patch_size
    if p > min(h, w):
        raise AttackError(f"attack.patch_size: {p} is larger than the {h}x{w} images")
    loc = attack.patch_location
    if loc == "random":                      # one location for every poison, drawn from the seed
        rng = np.random.default_rng([seed, 31])
        return int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
    rows = {"top": 0, "bottom": h - p, "center": (h - p) // 2}
    cols = {"left": 0, "right": w - p, "center": (w - p) // 2}
    if loc == "center":
        return rows["center"], cols["center"]
    r, c = loc.split("_")
    return rows[r], cols[c]


def _blend_pattern(attack, shape: tuple, seed: int) -> np.ndarray:
    h, w, c = shape
    if attack.blend_pattern == "noise":
        return np.random.default_rng([seed, 11]).integers(0, 256, shape, dtype=np.uint8)
    from PIL import Image

    path = Path(attack.blend_image)
    try:
        img = Image.open(path)
        img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
    except (OSError, ValueError) as e:
        raise AttackError(f"attack.blend_image: cannot read {path} as an image: {e}") from None
    return np.asarray(img, np.uint8).reshape(h, w, c)


def sig_signal(shape: tuple, delta: float, frequency: float) -> np.ndarray:
    """v(i, j) = Δ sin(2π j f / W), the same on every row and channel (float32, H x W x C)."""
    h, w, c = shape
    row = delta * np.sin(2 * np.pi * np.arange(w) * frequency / w)
    return np.broadcast_to(row[None, :, None], (h, w, c)).astype(np.float32)


def apply_trigger(images: np.ndarray, attack, seed: int, test: bool = False) -> np.ndarray:
    """The attack's trigger on every image of ``images`` (uint8, N x H x W x C)."""
    out = images.copy()
    if attack.kind == "badnets":
        _, h, w, c = images.shape
        r, col = patch_origin(attack, h, w, seed)
        p = attack.patch_size
        out[:, r:r + p, col:col + p, :] = _patch(attack, c, seed)
    elif attack.kind == "blend":
        pattern = _blend_pattern(attack, images.shape[1:], seed)
        mixed = (1 - attack.blend_alpha) * images.astype(np.float32) + attack.blend_alpha * pattern
        out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    elif attack.kind == "sig":
        delta = attack.sig_test_delta if test and attack.sig_test_delta is not None else attack.sig_delta
        mixed = images.astype(np.float32) + sig_signal(images.shape[1:], delta, attack.sig_frequency)
        out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"no trigger for attack kind {attack.kind!r}")
    return out


def attack_targets(labels: np.ndarray, attack, num_classes: int) -> np.ndarray:
    """The label the attack wants for examples of true label ``labels``."""
    if attack.mapping == "all_to_all":
        return (labels + 1) % num_classes
    return np.full(len(labels), attack.target_class, np.int64)


def poison_count(attack, n_train: int) -> int:
    return attack.poison_count if attack.poison_rate is None else int(round(attack.poison_rate * n_train))


def choose_poisons(labels: np.ndarray, attack, seed: int) -> np.ndarray:
    if attack.kind == "sig":                     # clean-label: only target-class images carry the signal
        pool = np.flatnonzero(labels == attack.target_class)
    elif attack.source_class is not None:
        pool = np.flatnonzero(labels == attack.source_class)
    elif attack.mapping == "all_to_all":
        pool = np.arange(len(labels))
    else:
        pool = np.flatnonzero(labels != attack.target_class)
    count = poison_count(attack, len(labels))
    if count < 1:
        raise AttackError(f"attack.poison_rate: {attack.poison_rate} of {len(labels)} training examples "
                          f"poisons none")
    if count > len(pool):
        raise AttackError(f"attack.poison_count: {count} poisoned examples requested but only {len(pool)} "
                          f"candidates")
    rng = np.random.default_rng([seed, 13])
    return np.sort(rng.choice(pool, size=count, replace=False))


def build_training_set(raw: RawData, attack, seed: int) -> TrainingSet:
    if raw.images is None:
        raise ValueError("build_training_set needs images")
    tr, te = ~raw.is_test, raw.is_test
    images, labels = raw.images[tr].copy(), raw.labels[tr].copy()
    original = labels.copy()
    poisoned = (raw.poisoned[tr].copy() if raw.poisoned is not None
                else np.full(len(labels), -1, np.int8))
    test_images, test_labels, test_ids = raw.images[te], raw.labels[te], raw.ids[te]
    empty = np.zeros((0, *images.shape[1:]), np.uint8)
    trig = (empty, np.zeros(0, np.int64), np.zeros(0, dtype=test_ids.dtype))
    targets = np.zeros(0, np.int64)
    target = None
    if attack.kind != "none":
        num_classes = len(raw.classes)
        target = attack.target_class if attack.mapping == "all_to_one" else None
        idx = choose_poisons(labels, attack, seed)
        images[idx] = apply_trigger(images[idx], attack, seed)
        if attack.kind != "sig":                # dirty-label attacks relabel their poisons
            labels[idx] = attack_targets(labels[idx], attack, num_classes)
        poisoned = np.zeros(len(labels), np.int8)
        poisoned[idx] = 1
        keep = test_labels != attack.target_class if attack.mapping == "all_to_one" else np.ones(len(test_labels), bool)
        trig = (apply_trigger(test_images[keep], attack, seed, test=True), test_labels[keep],
                np.array([f"{i}+trigger" for i in test_ids[keep]]))
        targets = attack_targets(test_labels[keep], attack, num_classes).astype(np.int64)
    return TrainingSet(images, labels, raw.ids[tr], original, poisoned, test_images, test_labels,
                       test_ids, *trig, target, raw.classes, targets)
