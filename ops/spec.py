"""Experiment specs: one YAML file per experiment, validated before anything is written.

Every section refuses unknown keys; wrong types and impossible values are reported with the
dotted key that holds them (``subsets.alpha: must be in (0, 1), got 1.5``).  Checks that need
the data (a poison count larger than the class it draws from, a dataset that is not there)
run in ``validate_against_data``, which reads only labels.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """A spec was refused; the message names the file and the key."""


def user_dir() -> Path:
    """The directory the user started provenance from: ``$PROVENANCE_CWD`` (the ``./provenance``
    wrapper sets it before it changes to the checkout), else the process's working directory."""
    return Path(os.environ.get("PROVENANCE_CWD") or os.getcwd())


def user_path(p: str | os.PathLike) -> Path:
    """A path a user typed: ``~`` expanded, a relative one taken from :func:`user_dir`."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else user_dir() / p


def _absolute(v):
    return None if v is None else str(user_path(v))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Section):
    source: Literal["digits", "fashion_mnist", "cifar10", "image_folder", "parquet"] = "digits"
    path: Optional[str] = None          # IDX folder, image folder, Parquet file, torchvision root
    test_path: Optional[str] = None     # image folder or Parquet table of the test split
    download: bool = False              # let torchvision download fashion_mnist / cifar10
    test_fraction: float = Field(0.2, gt=0, lt=1)   # when the source has no test split
    limit_train: Optional[int] = Field(None, gt=0)
    limit_test: Optional[int] = Field(None, gt=0)
    image_size: Optional[int] = Field(None, gt=0)   # resize image_folder/parquet images (square)
    channels: Literal[1, 3] = 3                     # for image_folder/parquet
    image_column: str = "image"
    label_column: str = "label"

    @field_validator("path", "test_path")
    @classmethod
    def _user_paths(cls, v):        # relative paths: from the user's directory (user_dir), not the checkout
        return _absolute(v)

    @model_validator(mode="after")
    def _paths(self):
        if self.source in ("image_folder", "parquet") and not self.path:
            raise ValueError(f"path: required for source {self.source!r}")
        return self


class AttackSpec(_Section):
    """The attack planted in the training split (ops/attacks.py describes each kind)."""
    kind: Literal["none", "badnets", "blend", "sig"] = "none"
    target_class: int = Field(0, ge=0)
    mapping: Literal["all_to_one", "all_to_all"] = "all_to_one"   # all_to_all: class y -> (y + 1) mod C
    source_class: Optional[int] = Field(None, ge=0)   # None: any class but the target
    poison_count: int = Field(0, ge=0)
    poison_rate: Optional[float] = Field(None, gt=0, lt=1)   # instead of poison_count: share of the train split
    patch_size: int = Field(2, gt=0)
    patch_value: int = Field(255, ge=0, le=255)
    patch_pattern: Literal["solid", "checkerboard", "random"] = "solid"
    patch_location: Literal["bottom_right", "bottom_left", "top_right", "top_left", "center",
                            "random"] = "bottom_right"
    blend_alpha: float = Field(0.2, gt=0, lt=1)
    blend_pattern: Literal["noise", "image"] = "noise"
    blend_image: Optional[str] = None    # blend_pattern image: an image file, resized to the dataset's
    sig_delta: float = Field(20.0, gt=0, le=255)       # sig: amplitude in pixel values (0-255)
    sig_frequency: float = Field(6.0, gt=0)            # sig: periods across the image width
    sig_test_delta: Optional[float] = Field(None, gt=0, le=255)   # sig: amplitude at test time

    @field_validator("blend_image")
    @classmethod
    def _user_path(cls, v):
        return _absolute(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind != "none" and self.poison_count == 0 and self.poison_rate is None:
            raise ValueError("poison_count: must be > 0 for an attack (or set poison_rate)")
        if self.poison_count and self.poison_rate is not None:
            raise ValueError("poison_rate: give poison_count or poison_rate, not both")
        if self.source_class is not None and self.source_class == self.target_class:
            raise ValueError("source_class: must differ from target_class")
        if self.kind == "sig" and self.mapping != "all_to_one":
            raise ValueError("mapping: the sig attack is clean-label and aims at target_class (all_to_one)")
        if self.kind == "sig" and self.source_class is not None:
            raise ValueError("source_class: the sig attack poisons target-class images only")
        if self.mapping == "all_to_all" and self.source_class is not None:
            raise ValueError("source_class: an all_to_all attack poisons every class")
        if self.kind == "blend" and self.blend_pattern == "image" and not self.blend_image:
            raise ValueError("blend_image: required for blend_pattern image")
        return self


class ModelSpec(_Section):
    arch: str = "mlp"                    # logreg | mlp | small_cnn | resnet9 | torchvision.<name>
    hidden: int = Field(64, gt=0)        # width: hidden units, or channels of the first conv

    @field_validator("arch")
    @classmethod
    def _arch(cls, v):
        from kernels.archs import ARCHS, TORCHVISION

        if v in ARCHS:
            return v
        if v.startswith(TORCHVISION):
            from kernels.models import torchvision_models   # torch + torchvision: only for these

            name = v[len(TORCHVISION):]
            if name in torchvision_models():
                return v
            near = difflib.get_close_matches(name, torchvision_models(), n=3)
            raise ValueError(f"no torchvision classification model {name!r}"
                             + (f" (did you mean {', '.join(near)}?)" if near else ""))
        raise ValueError(f"must be one of {', '.join(ARCHS)} or torchvision.<name> "
                         f"(a torchvision.models classification model), got {v!r}")


class TrainingSpec(_Section):
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    schedule: Literal["triangular", "cosine", "step", "constant", "two_regime"] = "triangular"
    peak_epoch_frac: float = Field(0.25, gt=0, lt=1)
    step_milestones: list[float] = [0.5, 0.75]
    step_gamma: float = Field(0.1, gt=0)
    switch_frac: float = Field(0.75, gt=0, lt=1)     # two_regime: share of the large-step phase
    small_lr: float = Field(0.005, gt=0)            # two_regime: small-step learning rate
    flip: bool = False
    translate: int = Field(0, ge=0)
    cutout: int = Field(0, ge=0)
    amp: bool | Literal["auto"] = "auto"   # bfloat16 autocast; auto: for conv models on native-bf16 hardware
    channels_last: bool = False      # CUDA; CPU convolutions always run channels-last
    tta_flip: bool = False           # flip test-time augmentation when evaluating
    save_epochs: list[int] = []      # also keep every model as it was after these epochs
    models_per_batch: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _save_epochs(self):
        bad = [e for e in self.save_epochs if not 0 < e < self.epochs]
        if bad:
            raise ValueError(f"save_epochs: {bad} not within 1..{self.epochs - 1} (the last epoch is always kept)")
        return self

    @field_validator("amp", mode="before")
    @classmethod
    def _amp(cls, v):
        if v is True or v is False or v == "auto":
            return v
        raise ValueError(f"must be true, false or auto, got {v!r}")

    @field_validator("step_milestones")
    @classmethod
    def _milestones(cls, v):
        if any(not 0 < m < 1 for m in v) or list(v) != sorted(v):
            raise ValueError(f"must be increasing fractions in (0, 1), got {v}")
        return v


class SubsetsSpec(_Section):
    alpha: float = 0.5
    num_models: int = Field(128, ge=2)
    num_heldout: int = Field(64, ge=2)

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if not 0 < v < 1:
            raise ValueError(f"must be in (0, 1), got {v}")
        return v


class TrakSpec(_Section):
    num_models: int = Field(32, gt=0)
    # auto: chosen from proj_dim_grid (dense projector: features at the largest k, smaller k as prefixes)
    proj_dim: Union[int, Literal["auto"]] = 256
    lam: Union[float, Literal["auto"]] = 1e-2   # ridge, relative to the mean eigenvalue of ΦᵀΦ; auto: lam_grid
    proj_dim_grid: list[int] = [64, 128, 256, 512, 1024, 2048]
    lam_grid: list[float] = [1e-3, 1e-2, 1e-1, 1.0]
    select_fraction: float = Field(0.4, gt=0, lt=1)   # held-out models that choose auto k/λ (LDS on the rest)
    select_targets: int = Field(1000, gt=1)           # targets the choice is made on (a seeded sample)
    top_k: int = Field(20, gt=0)        # attributions kept per target in the warehouse

    @field_validator("proj_dim", "lam", mode="before")
    @classmethod
    def _number_or_auto(cls, v, info):
        dim = info.field_name == "proj_dim"
        ok = v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0) if dim else \
            v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)
        if not ok:
            raise ValueError(f"must be {'a positive integer' if dim else 'a non-negative number'} or 'auto', "
                             f"got {v!r}")
        return v

    @field_validator("proj_dim_grid", "lam_grid")
    @classmethod
    def _grid(cls, v, info):
        if not v or any(x <= 0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct positive values, got {v!r}")
        return sorted(v)

    @model_validator(mode="after")
    def _auto(self):
        if self.proj_dim == "auto" and self.projector != "dense":
            raise ValueError("proj_dim: auto needs projector: dense (smaller k are prefixes of the dense "
                             "projection; the factored plan has no such nesting) -- give the factored projector a "
                             "proj_dim")
        return self

    @property
    def feature_dim(self) -> int:
        """Width of the stored gradient features: proj_dim, or the largest of the grid for auto."""
        return max(self.proj_dim_grid) if self.proj_dim == "auto" else self.proj_dim
    checkpoint_epochs: list[int] = []   # also featurize each model as it was after these epochs
                                        # (from training.save_epochs): more ensemble members per model
    projector: Literal["dense", "factored"] = "dense"   # kernels/projectors.py
    memory_gb: float = Field(2.0, gt=0)  # per-example work and score tiles are sized to fit this


class DatamodelsSpec(_Section):
    n_lambdas: int = Field(16, gt=1)
    eps: float = Field(1e-2, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    tol: float = Field(1e-6, gt=0, lt=1)          # relative duality gap every target must reach
    memory_mb: float = Field(512, gt=0)           # targets are fitted in blocks within this
    solver: Literal["auto", "cd", "gram", "fista"] = "auto"   # auto: kernels.lasso.choose_solver
    max_iter: int = Field(300, gt=0)              # FISTA iterations per path step


class LdsSpec(_Section):
    min_heldout: int = Field(30, gt=1)   # fewer held-out models fails the LDS check
    bootstrap: int = Field(500, ge=10)   # replicates of the interval over held-out models and targets


DETECTOR_METHODS = ("strongest_feature", "spectral_signatures", "activation_clustering", "spectre")


class DetectorSpec(_Section):
    methods: list[Literal[DETECTOR_METHODS]] = list(DETECTOR_METHODS)   # the first one is the report's headline
    # the train x train matrix the search runs on: TRAK's, or datamodels fitted to every subset model's
    # margins on the training examples (the paper's input; needs many models, e.g. the demo's 576)
    input: Literal["trak", "datamodels"] = "trak"
    # the matrix the search runs on: the default (clean_whiten) is the kernel of TRAK's gradient features
    # centred at every label's clean test mean and whitened by the test split's covariance
    # (kernels.trak.clean_whitened_kernel); the others prepare TRAK's scores
    # (kernels.local_search.influence_matrix).  clean_whiten and divide_q_test_center assume the test
    # split is not poisoned
    prepare: Literal["clean_whiten", "paper", "divide_q_center", "divide_q_double_center", "divide_q_test_center",
                     "row_scale", "row_scale_center"] = "clean_whiten"
    min_reference: int = Field(10, gt=0)  # a label with fewer test examples is centred at its training mean
    score: Literal["membership", "support"] = "support"   # per-example score (kernels.local_search)
    # where the local search runs: over the whole matrix (the paper), in every label's block, or both
    search: Literal["global", "per_label", "both"] = "both"
    # also flag every training example scoring above every clean test example (clean_whiten only)
    test_null: bool = True
    sizes: Optional[list[int]] = None    # None: 10, 20, 40, ... up to n/2
    restarts: int = Field(200, gt=0)
    swaps: int = Field(100, gt=0)
    max_passes: int = Field(50, gt=0)
    size_exponent: float = Field(0.5, ge=0)   # a size-k solution counts k^-e (the paper: e = 1)
    flag_count: Optional[int] = Field(None, gt=0)   # None: flag the group that stands out
    min_separation: float = Field(4.5, gt=0)
    retrain: bool = True                 # retrain without each method's flagged set and report ASR

    @model_validator(mode="before")
    @classmethod
    def _datamodels_default_prepare(cls, data):
        # datamodels have no gradient features to centre at test examples: double centring by default
        if isinstance(data, dict) and data.get("input") == "datamodels" and "prepare" not in data:
            return {**data, "prepare": "divide_q_double_center"}
        return data

    @model_validator(mode="after")
    def _input_prepare(self):
        if self.input == "datamodels" and self.prepare in ("divide_q_test_center", "clean_whiten"):
            raise ValueError(f"prepare: {self.prepare} needs TRAK's gradient features; with input: datamodels "
                             "use divide_q_double_center, divide_q_center or paper")
        return self

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if v is not None and (not v or any(k <= 0 for k in v)):
            raise ValueError("must be a non-empty list of positive sizes")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be a non-empty list without repeats, got {v}")
        return v


class NeuralSpec(_Section):
    """The neural-response proxy of Guo et al. (shared/reference/seeds-part2.md §1): a frozen
    "brain" (the robust model's penultimate layer, ``sites`` units, trial noise), a recording
    session, surrogate readouts on standard and robust features, attacks through each surrogate."""
    enabled: bool = True
    sites: int = Field(100, gt=0)
    images: int = Field(2000, ge=20)          # recording session (training split images)
    repeats: int = Field(4, gt=1)
    noise: float = Field(0.5, ge=0)            # trial noise sd, relative to each site's response sd
    budgets: list[float] = [0.25, 0.5, 1.0, 2.0]   # l2, pixel units
    attack_images: int = Field(200, gt=0)      # held-out images attacked
    steps: int = Field(20, gt=0)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v):
        if not v or any(b <= 0 for b in v):
            raise ValueError(f"must be a non-empty list of positive l2 budgets, got {v}")
        return v


class RobustnessSpec(_Section):
    """The robustness study (docs/studies.md): PGD adversarial training, robust ensembles (Saligrama
    & Leclerc) and attacks on a neural-response proxy (Guo et al.).  Budgets in pixel units."""
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(0.1, gt=0)
    steps: int = Field(5, gt=0)                     # PGD steps in training
    step_size: Optional[float] = Field(None, gt=0)  # default 2.5 eps / steps
    random_start: bool = True
    epochs: Optional[int] = Field(None, gt=0)       # default training.epochs
    eps_train: list[float] = [0.5, 1.0]             # training budgets, multiples of eps
    eps_test: list[float] = [0.5, 1.0, 2.0]         # attack budgets, multiples of eps
    ensemble_sizes: list[int] = [1, 2, 4]
    eval_steps: int = Field(20, gt=0)               # evaluation: more steps than training, restarts
    eval_restarts: int = Field(2, gt=0)
    eval_examples: int = Field(1000, gt=0)          # test examples attacked
    fusion: bool = True                             # scheme (b): robust + standard features, trained head
    fusion_epochs: int = Field(10, gt=0)
    neural: NeuralSpec = NeuralSpec()

    @field_validator("eps_train", "eps_test")
    @classmethod
    def _factors(cls, v):
        if not v or any(f <= 0 for f in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct positive multiples of eps, got {v}")
        return sorted(v)

    @field_validator("ensemble_sizes")
    @classmethod
    def _sizes(cls, v):
        if not v or any(k < 1 for k in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct ensemble sizes >= 1, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _steps(self):
        if self.neural.enabled and max(self.ensemble_sizes) < 2:
            raise ValueError("ensemble_sizes: the neural-response proxy needs at least 2 models per budget (the "
                             "brain is one robust model, the robust surrogate another); add 2, or set "
                             "neural.enabled: false")
        if self.eval_steps < self.steps:
            raise ValueError(f"eval_steps: {self.eval_steps} is fewer than the training attack's {self.steps} "
                             "steps; evaluate with at least as many")
        return self


class RegimesSpec(_Section):
    """The two-regimes study (ops/regimes.py): learning-rate schedules at one epoch budget over
    seeds, and the momentum / learning-rate equivalence of the large-step phase."""
    schedules: list[Literal["step", "triangular", "two_regime", "small_only"]] = \
        ["step", "triangular", "two_regime", "small_only"]
    seeds: int = Field(3, ge=1, le=64)
    epochs: Optional[int] = Field(None, gt=0)         # default training.epochs
    lr: Optional[float] = Field(None, gt=0)           # the large rate; default training.lr
    momentum: float = Field(0.9, ge=0, lt=1)          # step, triangular and the small-step phase
    small_lr: float = Field(0.005, gt=0)
    switch_frac: float = Field(0.75, gt=0, lt=1)
    momenta: list[float] = [0.5, 0.9]                 # the equivalence sweep: μ at η(1 − μ) and at η
    equivalence_epochs: int = Field(5, gt=0)

    @field_validator("schedules")
    @classmethod
    def _schedules(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be distinct schedules, got {v}")
        return v

    @field_validator("momenta")
    @classmethod
    def _momenta(cls, v):
        if any(not 0 < m < 1 for m in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct momenta in (0, 1), got {v}")
        return sorted(v)


class SmallifySpec(_Section):
    """The Smallify study (ops/smallify.py): a λ sweep of pruning during training against a grid of
    statically sized networks with the same training budget."""
    arch: Literal["mlp", "cnn"] = "mlp"
    hidden: Optional[list[int]] = None                # mlp: hidden widths (default [256, 256]); cnn: its
                                                      # fully connected layers after the convolutions (default [128])
    channels: list[int] = [32, 64]                    # cnn: conv channels (3x3, ReLU, 2x2 max pool each)
    lambdas: list[float] = [0.0, 0.003, 0.01, 0.03]   # L1 weights on the switches
    width_grid: list[float] = [0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0]   # static networks: the widths scaled
    epochs: Optional[int] = Field(None, gt=0)         # default training.epochs
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    prune_every: int = Field(50, gt=0)                # steps between removal checks
    threshold: float = Field(0.5, gt=0)               # sign variance above which a unit is removed
    seeds: int = Field(1, ge=1, le=16)
    tolerance: float = Field(0.01, ge=0, lt=1)        # "similar accuracy": within this of the best static network
    latency_threads: int = Field(1, ge=1)
    latency_repeats: int = Field(30, ge=3)

    @field_validator("hidden", "channels")
    @classmethod
    def _widths(cls, v):
        if v is not None and (not v or any(w < 1 for w in v)):
            raise ValueError(f"must be a non-empty list of widths >= 1, got {v}")
        return v

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, v):
        if not v or any(x < 0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct non-negative L1 weights, got {v}")
        return sorted(v)

    @field_validator("width_grid")
    @classmethod
    def _grid(cls, v):
        if not v or any(not 0 < f <= 1 for f in v) or len(set(v)) != len(v) or 1.0 not in v:
            raise ValueError(f"must be distinct width fractions in (0, 1] including 1.0 (the full network), got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _defaults(self):
        if self.hidden is None:
            object.__setattr__(self, "hidden", [256, 256] if self.arch == "mlp" else [128])
        return self


class ThreeDBSpec(_Section):
    """The 3DB study (ops/threedb_study.py): render objects under controlled variations (a 3DB-style
    config) and find where a model fails."""
    config: Union[str, dict]                 # a 3DB-style YAML file (ops/threedb.py) or the config inline
    model: str = "rendered"                  # "rendered": train ``arch`` on rendered objects; or
                                             # "torchvision.<name>" loading ``weights`` from disk
    weights: Optional[str] = None            # the torchvision model's state dict (safetensors, or a
                                             # torch file loaded with weights_only)
    label_map: Optional[dict[str, int]] = None   # object -> the model's output index (when its outputs
                                                 # are not the config's classes, e.g. ImageNet)
    arch: str = "small_cnn"                  # "rendered": the classifier (kernels/models.py)
    hidden: int = Field(32, gt=0)
    train_images: int = Field(3000, gt=0)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.02, gt=0)            # 0.05 (batch 128) left the 64 px classifier at chance
    chunk: int = Field(128, gt=0)            # render jobs per dynamic op
    heatmaps: Optional[list[tuple[str, str]]] = None   # pairs of "control.param"; default every pair of
                                                       # the searched continuous parameters (at most 6)

    @field_validator("config")
    @classmethod
    def _config(cls, v):
        from ops.threedb import ThreeDBConfigError, load_config, parse_config

        try:
            if isinstance(v, str):
                path = user_path(v)
                load_config(path)
                return str(path)
            parse_config(v, "<inline>")
            return v
        except ThreeDBConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("weights")
    @classmethod
    def _weights(cls, v):
        return _absolute(v)

    @model_validator(mode="after")
    def _model(self):
        if self.model != "rendered" and not self.model.startswith("torchvision."):
            raise ValueError(f"model: must be 'rendered' or 'torchvision.<name>', got {self.model!r}")
        if self.model != "rendered" and self.weights is None:
            raise ValueError("weights: a torchvision model needs its weights on disk (nothing is downloaded)")
        return self


class PhotoGuardEncoderSpec(_Section):
    """The encoder attack (PhotoGuard's ``pgd``): l_inf PGD of the VAE encoder's latent towards a target."""
    eps: float = Field(0.06, gt=0, le=2)            # l_inf budget, pixels in [-1, 1] (0.06 ~ 8/255 on [0, 1])
    step: float = Field(0.01, gt=0)                 # first step; decays linearly to step / 100
    iters: int = Field(200, gt=0)
    target: Literal["gray", "zero"] = "gray"        # latent target: the encoding of a gray image (app.py), or 0


class PhotoGuardDiffusionSpec(_Section):
    """The diffusion attack (``super_l2`` / ``super_linf``): PGD through a few-step copy of the
    inpainting loop towards a gray edit, averaged over ``grad_reps`` noise draws."""
    norm: Literal["l2", "linf"] = "l2"
    eps: Optional[float] = Field(None, gt=0)        # default l2: 16 * image_size / 512 (the paper's 16 at
                                                    # 512 px), linf: 0.1
    step: Optional[float] = Field(None, gt=0)       # default l2: image_size / 512, linf: 0.006
    iters: int = Field(50, gt=0)                    # the paper: 200
    grad_reps: int = Field(4, gt=0)                 # the paper: 10
    num_steps: int = Field(4, gt=0)                 # DDIM steps of the attacked loop
    guidance: float = Field(7.5, ge=0)
    eta: float = Field(1.0, ge=0, le=1)
    label: Literal["null", "condition"] = "null"    # the class the attacked loop is guided to: the null class
                                                    # (the paper's empty prompt) or the edit's own
    rep_chunk: Optional[int] = Field(None, gt=0)    # draws per forward/backward pass (memory; default all)


class PhotoGuardEditSpec(_Section):
    """The edits the immunization is meant to spoil: DDIM inpainting (app.py's settings)."""
    num_steps: int = Field(100, gt=0)
    guidance: float = Field(7.5, ge=0)
    eta: float = Field(1.0, ge=0, le=1)
    strength: float = Field(1.0, gt=0, le=1)        # < 1: start from the image's latents noised this far


class PhotoGuardSpec(_Section):
    """The PhotoGuard study (ops/photoguard.py): immunize images against diffusion inpainting (the
    encoder and the diffusion attack, against a random-noise baseline at the same budget), edit
    clean and immunized images, compare the edits.  The models are trained here (a small VAE, a
    class-conditioned latent inpainting UNet, a classifier for FID features and agreement) unless
    ``checkpoint`` names a diffusers inpainting folder (e.g. Stable Diffusion inpainting)."""
    image_size: int = Field(32, ge=16)              # images are made square at this side (a multiple of 8)
    checkpoint: Optional[str] = None                # a diffusers inpainting folder (vae/, unet/, scheduler/):
                                                    # used as it is, nothing is trained but the classifier
    context: Optional[str] = None                   # with a text-conditioned checkpoint: a .npy [1, L, D] text
                                                    # embedding to condition on (default zeros: unconditional)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"   # the models' dtype (float16 on a GPU)
    variant: Optional[str] = None                   # checkpoint weight variant, e.g. fp16
    images: Optional[str] = None                    # a folder of the user's own images to immunize (default:
                                                    # the experiment's test split)
    n_images: int = Field(16, ge=2)                 # images immunized and edited
    condition: Union[Literal["own"], int] = "own"   # the class edits are conditioned on: each image's own,
                                                    # or one class for all
    mask: Literal["center", "random"] = "center"    # the region the editor repaints (the rest is immunized)
    mask_frac: float = Field(0.5, gt=0, lt=1)       # its side as a fraction of the image's (random: on average)
    noise_eps: Optional[float] = Field(None, gt=0)  # the random-noise baseline's l_inf budget (default encoder.eps)
    vae_channels: list[int] = [32, 64]              # the trained VAE's block widths (each after the first halves)
    unet_channels: list[int] = [32, 64]             # the trained UNet's block widths
    train_images: Optional[int] = Field(None, gt=0)  # training images for the models (default the whole split)
    vae_steps: int = Field(500, ge=0)
    unet_steps: int = Field(1500, ge=0)
    batch_size: int = Field(32, gt=0)               # VAE and UNet training batches
    vae_lr: float = Field(1e-3, gt=0)
    unet_lr: float = Field(2e-4, gt=0)
    classifier_epochs: int = Field(4, gt=0)         # the local classifier (kernels.models small_cnn)
    classifier_hidden: int = Field(32, gt=0)
    quality_images: int = Field(100, ge=2)          # held-out images the models' quality is measured on
    batch: int = Field(8, gt=0)                     # images attacked at once
    encoder: PhotoGuardEncoderSpec = PhotoGuardEncoderSpec()
    diffusion: PhotoGuardDiffusionSpec = PhotoGuardDiffusionSpec()
    edit: PhotoGuardEditSpec = PhotoGuardEditSpec()

    @field_validator("image_size")
    @classmethod
    def _side(cls, v):
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v):
        if v is None:
            return v
        path = user_path(v)
        if not path.is_dir():
            raise ValueError(f"no such folder {path}")
        missing = [d for d in ("vae", "unet", "scheduler") if not (path / d).is_dir()]
        if missing:
            raise ValueError(f"{path} is not a diffusers inpainting folder: no {', '.join(f'{d}/' for d in missing)}")
        return str(path)

    @field_validator("context")
    @classmethod
    def _context(cls, v):
        if v is None:
            return v
        path = user_path(v)
        if not path.is_file():
            raise ValueError(f"no such file {path}")
        return str(path)

    @field_validator("images")
    @classmethod
    def _images(cls, v):
        if v is None:
            return v
        from ops.sources import IMAGE_SUFFIXES

        path = user_path(v)
        if not path.is_dir():
            raise ValueError(f"no such folder {path}")
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir() if f.is_file()):
            raise ValueError(f"{path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return str(path)

    @field_validator("condition", mode="before")
    @classmethod
    def _condition(cls, v):
        if v != "own" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"must be 'own' or a class index >= 0, got {v!r}")
        return v

    @field_validator("vae_channels", "unet_channels")
    @classmethod
    def _channels(cls, v):
        if not v or any(c < 8 or c % 8 for c in v):
            raise ValueError(f"must be a non-empty list of widths that are multiples of 8, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.context is not None and self.checkpoint is None:
            raise ValueError("context: only a checkpoint's text-conditioned UNet reads a context")
        if self.variant is not None and self.checkpoint is None:
            raise ValueError("variant: names a checkpoint's weight files; set checkpoint")
        return self

    @property
    def diffusion_eps(self) -> float:
        d = self.diffusion
        return d.eps if d.eps is not None else (16 * self.image_size / 512 if d.norm == "l2" else 0.1)

    @property
    def diffusion_step(self) -> float:
        d = self.diffusion
        return d.step if d.step is not None else (self.image_size / 512 if d.norm == "l2" else 0.006)

    @property
    def noise_budget(self) -> float:
        return self.noise_eps if self.noise_eps is not None else self.encoder.eps


class Spec(_Section):
    name: str
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**31)
    inbox: Optional[str] = None       # folder of new query examples (default: <store>/<name>/inbox)
    dataset: DatasetSpec = DatasetSpec()
    attack: AttackSpec = AttackSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    subsets: SubsetsSpec = SubsetsSpec()
    trak: TrakSpec = TrakSpec()
    datamodels: DatamodelsSpec = DatamodelsSpec()
    lds: LdsSpec = LdsSpec()
    detector: DetectorSpec = DetectorSpec()
    robustness: Optional[RobustnessSpec] = None     # a study: absent, it does not run
    regimes: Optional[RegimesSpec] = None           # a study
    smallify: Optional[SmallifySpec] = None         # a study
    threedb: Optional[ThreeDBSpec] = None           # a study
    photoguard: Optional[PhotoGuardSpec] = None     # a study

    @field_validator("inbox")
    @classmethod
    def _inbox(cls, v):
        return _absolute(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not NAME_RE.match(v):
            raise ValueError(f"must be 1-64 letters, digits, '_', '-', '.', got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross(self):
        if self.trak.num_models > self.subsets.num_models:
            raise ValueError(f"trak.num_models: {self.trak.num_models} exceeds subsets.num_models "
                             f"({self.subsets.num_models})")
        kept = set(self.training.save_epochs)
        missing = [e for e in self.trak.checkpoint_epochs if e not in kept]
        if missing:
            raise ValueError(f"trak.checkpoint_epochs: {missing} not in training.save_epochs "
                             f"{sorted(kept)}; TRAK can only use checkpoints that training keeps")
        if len(set(self.trak.checkpoint_epochs)) != len(self.trak.checkpoint_epochs):
            raise ValueError(f"trak.checkpoint_epochs: {self.trak.checkpoint_epochs} repeats an epoch")
        return self

    def digest(self) -> str:
        """What the spec says, hashed: fields left at their defaults are left out, so a field or
        section added to the schema later (with a default) changes no existing spec's digest (a
        run pinned before such a change still finds its pin)."""
        body = self.model_dump(mode="json", exclude_defaults=True)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _format_errors(where: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # model-level errors carry their own key as "key: message"
            if ": " in msg and not key:
                key, msg = msg.split(": ", 1)
            elif ": " in msg and msg.split(": ", 1)[0].replace("_", "").isalnum():
                sub, msg = msg.split(": ", 1)
                key = f"{key}.{sub}" if key else sub
        if e["type"] not in ("extra_forbidden", "value_error") and "input" in e:
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{where}: {key or '<spec>'}: {msg}")
    return "\n".join(lines)


def parse_spec(data: dict, where: str = "<spec>") -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(where, e)) from None


def load_spec_file(path: str | Path) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
        if data["name"] != path.stem:
            raise SpecError(f"{path}: name: {data['name']!r} must match the file name {path.stem!r}")
    return parse_spec(data, str(path))


def validate_against_data(spec: Spec, where: str = "<spec>", probe_images: bool = False) -> dict[int, int]:
    """Checks that need the data's labels (and, with ``probe_images``, every image's header).
    Returns the training label counts."""
    from ops.sources import SourceError, train_label_counts

    try:
        counts = train_label_counts(spec.dataset, spec.seed, probe=probe_images)
    except SourceError as e:
        raise SpecError(f"{where}: {e}") from None
    if len(counts) < 2:
        raise SpecError(f"{where}: dataset: the training split has {len(counts)} class"
                        f"{'' if len(counts) == 1 else 'es'} ({sorted(counts)}); classification needs at least two")
    a = spec.attack
    if a.kind != "none":
        classes = sorted(counts)
        n_all = sum(counts.values())
        count = a.poison_count if a.poison_rate is None else int(round(a.poison_rate * n_all))
        key = "poison_count" if a.poison_rate is None else "poison_rate"
        if a.target_class not in counts:
            raise SpecError(f"{where}: attack.target_class: class {a.target_class} does not exist "
                            f"(classes: {classes})")
        if count < 1:
            raise SpecError(f"{where}: attack.poison_rate: {a.poison_rate} of {n_all} training examples "
                            f"poisons none")
        if a.kind == "sig":
            avail, what = counts[a.target_class], f"target class {a.target_class} (a clean-label attack)"
        elif a.mapping == "all_to_all":
            avail, what = n_all, "the training split"
        elif a.source_class is not None:
            if a.source_class not in counts:
                raise SpecError(f"{where}: attack.source_class: class {a.source_class} does not exist "
                                f"(classes: {classes})")
            avail, what = counts[a.source_class], f"source class {a.source_class}"
        else:
            avail, what = sum(v for c, v in counts.items() if c != a.target_class), \
                f"the classes other than {a.target_class}"
        if count > avail:
            raise SpecError(f"{where}: attack.{key}: {count} poisoned examples requested "
                            f"but {what} has only {avail} training examples")
        if a.kind == "blend" and a.blend_pattern == "image" and not Path(a.blend_image).is_file():
            raise SpecError(f"{where}: attack.blend_image: no such file {a.blend_image}")
    n = sum(counts.values())
    n_sub = round(spec.subsets.alpha * n)
    if n_sub < 1 or n_sub >= n:
        raise SpecError(f"{where}: subsets.alpha: {spec.subsets.alpha} of {n} examples leaves an empty "
                        f"or full subset")
    if spec.detector.flag_count is not None and spec.detector.flag_count >= n:
        raise SpecError(f"{where}: detector.flag_count: {spec.detector.flag_count} is not below the "
                        f"{n} training examples")
    return counts


# ------------------------------------------------------------------ pinned specs
#
# A run reads the spec it started with, not the file as it is when a later step runs: the spec is
# snapshotted (its normalized form, paths already absolute) under
# ``<pins>/.pins/<name>/<digest>.json`` and the run names the digest (tag ``provenance/spec``, set by
# the sensor and ./provenance run; a run launched from the UI pins the file as its first step reads
# it, recorded in ``<pins>/.pins/<name>/runs/<run id>``).

SPEC_TAG = "provenance/spec"


def _write_exclusive(path: Path, text: str) -> bool:
    """Writes ``path`` unless it exists (atomically: a temporary file hard-linked into place)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def pin_spec(spec: Spec, pins: str | os.PathLike) -> str:
    """Snapshots ``spec``; returns its digest (the run tag's value)."""
    digest = spec.digest()
    path = Path(pins) / ".pins" / spec.name / f"{digest}.json"
    # what the spec says, as the digest covers it: defaults are the code's (a default changed by a
    # code update applies to a pinned run as to any other)
    text = spec.model_dump_json(indent=1, exclude_defaults=True)
    if not _write_exclusive(path, text) and not _pin_matches(path, digest):
        # a pin written in another format under the same digest (before digests left defaults out)
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return digest


def _pin_matches(path: Path, digest: str) -> bool:
    try:
        return parse_spec(json.loads(path.read_text()), str(path)).digest() == digest
    except (ValueError, SpecError, OSError):
        return False


def load_pinned(name: str, digest: str, pins: str | os.PathLike) -> Spec:
    path = Path(pins) / ".pins" / name / f"{digest}.json"
    if not path.is_file():
        raise SpecError(f"{path}: the spec this run was started with is missing (tag {SPEC_TAG}={digest})")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise SpecError(f"{path}: not valid JSON: {e}") from None
    spec = parse_spec(data, str(path))
    if spec.digest() != digest:
        raise SpecError(f"{path}: does not match its digest {digest} (edited after the run started?)")
    return spec


def pin_for_run(spec_file: str | os.PathLike, name: str, run_id: str, pins: str | os.PathLike) -> Spec:
    """The spec run ``run_id`` reads: the one its first caller found in ``spec_file``, pinned."""
    marker = Path(pins) / ".pins" / name / "runs" / run_id
    if not marker.is_file():
        spec = load_spec_file(spec_file)
        _write_exclusive(marker, pin_spec(spec, pins))   # a concurrent step may have won: read its pin
    return load_pinned(name, marker.read_text().strip(), pins)
