"""Poisoning attacks applied to the training split, with the ground truth kept.

``badnets``: a solid square patch in the bottom-right corner, label flipped to the target
(Gu et al. 2017).  ``blend``: a fixed random pattern blended in with weight alpha (Chen et al.
2017), label flipped.  Both also produce a triggered copy of the test examples that are not
of the target class: the share of them classified as the target is the attack success rate.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    target_class: int | None
    classes: list[str]


def apply_trigger(images: np.ndarray, attack, seed: int) -> np.ndarray:
    out = images.copy()
    if attack.kind == "badnets":
        p = attack.patch_size
        out[:, -p:, -p:, :] = attack.patch_value
    elif attack.kind == "blend":
        pattern = np.random.default_rng([seed, 11]).integers(0, 256, images.shape[1:], dtype=np.uint8)
        mixed = (1 - attack.blend_alpha) * images.astype(np.float32) + attack.blend_alpha * pattern
        out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"no trigger for attack kind {attack.kind!r}")
    return out


def choose_poisons(labels: np.ndarray, attack, seed: int) -> np.ndarray:
    if attack.source_class is not None:
        pool = np.flatnonzero(labels == attack.source_class)
    else:
        pool = np.flatnonzero(labels != attack.target_class)
    if attack.poison_count > len(pool):
        raise ValueError(f"attack.poison_count: {attack.poison_count} exceeds the {len(pool)} candidates")
    rng = np.random.default_rng([seed, 13])
    return np.sort(rng.choice(pool, size=attack.poison_count, replace=False))


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
    target = None
    if attack.kind != "none":
        target = attack.target_class
        idx = choose_poisons(labels, attack, seed)
        images[idx] = apply_trigger(images[idx], attack, seed)
        labels[idx] = target
        poisoned = np.zeros(len(labels), np.int8)
        poisoned[idx] = 1
        keep = test_labels != target
        trig = (apply_trigger(test_images[keep], attack, seed), test_labels[keep],
                np.array([f"{i}+trigger" for i in test_ids[keep]]))
    return TrainingSet(images, labels, raw.ids[tr], original, poisoned, test_images, test_labels,
                       test_ids, *trig, target, raw.classes)
