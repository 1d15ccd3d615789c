"""The detector registry: every poison detector the backdoor report runs.

A detector reads the stored artifacts through ``Inputs`` (the train x train influence matrix and,
for the default preparation, the clean test examples' rows of it; the penultimate features of the
model trained on all data; the labels) and returns a ``Detection``: a score per training example
(higher = more suspicious), the examples it flags, and the rule that chose them.  None is told the
poison count unless the spec's ``detector.flag_count`` says so (then every method flags that many).
The strongest-feature detector flags the upper group of an Otsu split of its scores and, where it
has the test rows, every training example scoring above every clean test example.  Register a new one with
``@register("name")``; the report, the warehouse and the bench iterate over ``DETECTORS`` and
never name a method.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from kernels.baselines import activation_clustering, spectre_scores
from kernels.local_search import (auto_flag, influence_matrix, null_support, prepare, same_label_support,
                                  strongest_feature_membership)
from kernels.trak import clean_whitened_kernel, label_mean_effects
from kernels.spectral import spectral_scores
from ops.spec import Spec
from ops.store import ArtifactStore

Log = Callable[[str], None]


@dataclass
class Detection:
    scores: np.ndarray
    flags: np.ndarray
    rule: str
    seconds: float = 0.0


@dataclass
class Inputs:
    """Lazy access to what detectors read, so that each loads only what it needs."""
    spec: Spec
    store: ArtifactStore
    exp: str
    device: torch.device
    log: Log
    labels: np.ndarray

    @property
    def n(self) -> int:
        return len(self.labels)

    @cached_property
    def models(self):
        """(make_model, the model trained on all data (its parameters), checkpoint metadata, Data)."""
        import json

        from ops.training import Data, load_member, model_factory

        make_model, meta = model_factory(self.spec, self.store, self.exp)
        full = load_member(self.spec, self.store, self.exp, int(meta["models"]) - 1)
        return make_model, full, meta, Data(self.store, self.exp, self.device, norm=json.loads(meta["norm"]))

    @cached_property
    def features(self) -> np.ndarray:
        """Penultimate features of the model trained on all data, on every training example."""
        make_model, full, meta, data = self.models
        model = make_model().to(self.device).eval()
        model.load_state_dict(full)
        out = []
        with torch.no_grad():
            for i in range(0, len(data.x), 2048):
                out.append(model.embed(data.x[i:i + 2048]).float().cpu().numpy())
        return np.concatenate(out)

    @property
    def influence(self) -> np.ndarray:
        """The train x train matrix the strongest-feature search runs on."""
        return self.prepared[0]

    @cached_property
    def test_labels(self) -> np.ndarray:
        return np.asarray(self.store.load_npy(self.exp, "training_set", "test_labels.npy"))

    @cached_property
    def prepared(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(train x train matrix, test x train rows or None); see ``detector.prepare`` in ops/spec.py.

        ``clean_whiten`` (the default) and ``divide_q_test_center`` centre every label at the mean
        gradient feature of its test examples; when some label has fewer than
        ``detector.min_reference`` of them, the whole matrix falls back to
        ``divide_q_double_center`` (each label centred at its own training examples), and the log
        says so."""
        d = self.spec.detector
        if d.input == "datamodels":            # no Q to divide out: the divide_q_* preparations only centre
            from ops.attribution import datamodels_train_x_train

            a = datamodels_train_x_train(self.spec, self.store, self.exp, self.log)
            return influence_matrix(a, np.ones(self.n), self.labels, d.prepare), None
        how = d.prepare
        if how in ("divide_q_test_center", "clean_whiten"):
            classes = np.unique(self.labels)
            counts = (self.test_labels[None, :] == classes[:, None]).sum(1)
            if counts.min() < d.min_reference:
                short = [c.item() for c, k in zip(classes, counts) if k < d.min_reference]
                self.log(f"strongest_feature: labels {short} have fewer than {d.min_reference} test examples "
                         f"(detector.min_reference); every label is centred at its training mean instead "
                         f"(divide_q_double_center)")
                how = "divide_q_double_center"
        from ops.attribution import trak_choice

        k, lam = trak_choice(self.spec, self.store, self.exp)     # auto: what attribution_scores chose
        if how == "clean_whiten":
            train = self.store.load_npy(self.exp, "gradient_features", "train.npy")
            test = self.store.load_npy(self.exp, "gradient_features", "test.npy")
            return clean_whitened_kernel(((train[m][:, :k], test[m][:, :k]) for m in range(len(train))), self.labels,
                                         self.test_labels, lam)
        tau = self.store.load_npy(self.exp, "attribution_scores", "train_x_train.npy")
        q = self.store.load_npy(self.exp, "attribution_scores", "q_mean.npy")
        references = None
        if how == "divide_q_test_center":
            classes = np.unique(self.labels)
            onehot = (self.test_labels[None, :] == classes[:, None]).astype(np.float64)     # C x t
            means = onehot / onehot.sum(1)[:, None]
            train = self.store.load_npy(self.exp, "gradient_features", "train.npy")
            test = self.store.load_npy(self.exp, "gradient_features", "test.npy")
            members = ((train[m][:, :k], means @ np.asarray(test[m][:, :k], np.float64)) for m in range(len(train)))
            references = label_mean_effects(members, lam)
        return influence_matrix(tau, q, self.labels, how, references), None


DETECTORS: dict[str, Callable[[Inputs], Detection]] = {}


def register(name: str):
    def deco(fn):
        DETECTORS[name] = fn
        return fn
    return deco


def _flag_by_rule(spec: Spec, scores: np.ndarray) -> tuple[np.ndarray, str]:
    d = spec.detector
    flags = np.zeros(len(scores), bool)
    if d.flag_count is not None:
        flags[np.argsort(-scores, kind="stable")[: d.flag_count]] = True
        return flags, f"top {d.flag_count} (detector.flag_count)"
    return auto_flag(scores, d.min_separation), f"upper group of an Otsu split, if > {d.min_separation} MADs apart"


@register("strongest_feature")
def strongest_feature(inp: Inputs) -> Detection:
    """Scores: within-label support from the search's membership (or the membership itself).
    Flags: the upper group of an Otsu split of the scores and, with the clean test rows
    (``clean_whiten``, ``detector.test_null``), every example whose support from either search
    (per-label, global) is above every clean test example's support from the same search's sets
    (docs/decisions.md: the per-label part holds each label's group, so its null reaches the weak
    groups of an all-to-all attack; the global part's null reaches the rest of a clean-label
    attack's poisons)."""
    d = inp.spec.detector
    a, rows = inp.prepared
    t0 = time.perf_counter()
    from ops.progress import advance_to, bar

    shown = bar(0, "strongest feature: local search", "size")

    def on_size(i, k, size):
        shown.total = k
        advance_to(shown, i + 1)
        inp.log(f"local search: {'size ' if isinstance(size, int) else ''}{size} "
                f"({i + 1}/{k}, {time.perf_counter() - t0:.1f}s)")

    with shown:
        parts = strongest_feature_membership(
            a, sizes=d.sizes, restarts=d.restarts, swaps=d.swaps, max_passes=d.max_passes, seed=inp.spec.seed,
            size_exponent=d.size_exponent, search=d.search, labels=inp.labels, parts=True, on_size=on_size)
    member = sum(parts.values())
    if d.score == "membership":
        flags, rule = _flag_by_rule(inp.spec, member)
        return Detection(member, flags, rule)
    b, _ = prepare(a)
    scores = same_label_support(b, member, inp.labels)
    flags, rule = _flag_by_rule(inp.spec, scores)
    if d.flag_count is None and d.test_null and rows is not None:
        said = [f"{int(flags.sum())} flagged by the Otsu split"]
        for part, m in parts.items():
            s_part = scores if len(parts) == 1 else same_label_support(b, m, inp.labels)
            null = null_support(rows, inp.test_labels, m, inp.labels)
            above = s_part > null.max()
            said.append(f"{int(above.sum())} whose support from the {part.replace('_', '-')} search is above all "
                        f"{len(null)} clean test examples' (max {null.max():.4g})")
            flags |= above
        inp.log(f"strongest_feature: {', '.join(said)}; {int(flags.sum())} in all")
        rule += "; or support from a search (each one's own) above every clean test example's"
    return Detection(scores, flags, rule)


@register("spectral_signatures")
def spectral_signatures(inp: Inputs) -> Detection:
    scores = spectral_scores(inp.features, inp.labels)
    flags, rule = _flag_by_rule(inp.spec, scores)
    return Detection(scores, flags, rule)


@register("activation_clustering")
def activation_clustering_detector(inp: Inputs) -> Detection:
    scores, flags = activation_clustering(inp.features, inp.labels, seed=inp.spec.seed)
    if inp.spec.detector.flag_count is not None:
        flags, rule = _flag_by_rule(inp.spec, scores)
    else:
        rule = "smaller 2-means cluster of a class when <= 35% of it and silhouette >= 0.15"
    return Detection(scores, flags, rule)


@register("spectre")
def spectre(inp: Inputs) -> Detection:
    scores = spectre_scores(inp.features, inp.labels, seed=inp.spec.seed)
    flags, rule = _flag_by_rule(inp.spec, scores)
    return Detection(scores, flags, rule)
