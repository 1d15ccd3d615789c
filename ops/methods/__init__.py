"""Attribution methods behind one small interface, registered in one place.

A method turns the training set into whatever it scores with (``fit``), scores targets against
the training set (``predict`` / ``scores_path``), and, where it can, scores examples it has never
seen against its stored training side without recomputing it (``score_new``; ``new_targets``
says whether it can), in the spirit of traker's gradient-computer / projector / score-computer
split.  The LDS stage, the
warehouse and the report iterate over ``METHODS``; adding a method is one new module here that
subclasses ``Method`` and is decorated with ``@register``, plus its line in the import list at
the bottom of this file.

Registered: ``trak`` (ops/methods/trak.py), ``datamodels``, ``tracin`` (TracIn-CP: dot products
of projected loss gradients summed over the saved checkpoints) and ``repsim`` (cosine similarity
of penultimate features).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ops.spec import Spec
from ops.store import ArtifactStore


@dataclass
class NewTargets:
    """Examples the experiment has never seen (ops/newdata.py), prepared once for every method:
    ``x`` normalized as the training splits and ``y`` their labels (on the compute device),
    ``features`` their TRAK features [checkpoints, t, k] under the training set's projections, and
    ``full_model`` the model trained on all the data, loaded."""
    x: object
    y: object
    features: Path
    full_model: object


@dataclass
class Context:
    spec: Spec
    store: ArtifactStore
    exp: str
    device: object = "cpu"
    log: Callable[[str], None] = lambda _: None


class Method:
    """One attribution method.  ``asset`` is the Dagster asset that computes it (its folder holds
    the method's artifacts); ``fit`` runs inside that asset for methods that need it."""

    name: str = ""
    asset: str = ""
    description: str = ""
    new_targets: bool = False       # can score examples it has never seen (score_new)

    def fit(self, ctx: Context) -> dict:
        """Compute the method's training-side features and its test x train scores."""
        return {}

    def scores_path(self, ctx: Context) -> Path:
        """[targets, train] float32 .npy of test x train scores (higher: more support)."""
        return ctx.store.require(ctx.exp, self.asset, f"{self.name}/test_x_train.npy")

    def top_table(self, ctx: Context) -> Path:
        """Parquet of the top supporting training examples per target (warehouse ``attributions``)."""
        return ctx.store.require(ctx.exp, self.asset, f"{self.name}/top_attributions.parquet")

    def score_new(self, ctx: Context, new: NewTargets, out_path: Path) -> None:
        """[t, n] float32 scores of ``new`` against the training set, written to ``out_path``, from
        the method's stored training side (nothing about the training set is recomputed)."""
        raise NotImplementedError(f"{self.name} cannot score examples it has not seen")

    def predict(self, ctx: Context, masks: np.ndarray) -> np.ndarray:
        """The method's prediction of every target's margin for models trained on ``masks``
        (models x train -> models x targets): Σ of the scores of the training subset."""
        from ops.attribution import _predict_blocks

        return _predict_blocks(self.scores_path(ctx), masks, ctx.spec.trak.memory_gb)


METHODS: dict[str, Method] = {}


def register(cls):
    METHODS[cls.name] = cls()
    return cls


# the registration list: one line per method module
from ops.methods import datamodels, repsim, tracin, trak  # noqa: E402,F401
