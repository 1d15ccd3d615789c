"""The 3DB study's search layer (issue 18; Leclerc et al. 2021, "3DB: a framework for debugging
computer vision models"): controls, the search space, policies, the classification evaluator and
the YAML config.  Nothing here knows Dagster; rendering is ``kernels.render``.

3DB's contract, kept:

- A **control** declares continuous parameters (each with a default search range) and discrete
  ones (each with its choices), and applies values to a scene.  Pre-processing controls change
  the 3D scene (camera, orientation, scale, pointlight, material); post-processing ones the 2D
  image (background, occlusion, imagenet_c).  Here a scene is an immutable
  :class:`kernels.render.SceneParams`, so ``apply`` returns a new one and nothing needs undoing.
- A config lists controls; a parameter it does not mention is searched over its default range, a
  scalar fixes it, a ``[lo, hi]`` (or 3DB's string ``"(lo, hi)"``) narrows or widens the range
  within the control's limits, and for a discrete parameter a list picks the choices searched.
- The :class:`SearchSpace` has ``d`` continuous dimensions and discrete dimensions of sizes
  ``n_1..n_k``; a **policy** emits points ``(u, j)`` with ``u`` in [0, 1]^d and ``j`` discrete
  indices, and ``SearchSpace.unpack`` rescales ``u_i`` to ``lo_i + u_i (hi_i - lo_i)`` and looks
  up each index.  ``grid_search``: ``samples_per_dim`` values ``linspace(0, 1)`` per continuous
  dimension times every discrete combination, ``spd^d * prod(n)`` points; ``random_search``:
  ``samples`` points, uniform, from ``seed``.
- Every point is rendered for every object of ``objects`` (3DB: every model x environment); the
  **evaluator** (``classification``) scores the model's logits against the object's label (its index in
  ``classes``): ``is_correct`` (top-k), cross-entropy ``loss``, ``prediction`` (top-1) and ``topk``.

A config (3DB's layout; ``base_config`` is a path relative to the file, and as in 3DB each top-level
key of the file replaces the base's whole value)::

    base_config: base.yaml
    objects: [crate, mug, ball]          # what to render (default: all of OBJECT_CLASSES)
    classes: [crate, mug, ball, cone, torus, capsule]   # the model's outputs, in order
    render_args: {engine: pyrender, resolution: 64}
    policy:
      module: grid_search                # or threedb.policies.grid_search
      samples_per_dim: 3
    controls:
      - module: orientation
        rotation_x: 0
        rotation_y: 0                    # rotation_z: searched over [-pi, pi]
      - module: camera
        zoom: [0.7, 1.3]
        view_point_x: 0
        view_point_y: -1
        view_point_z: 0.3
    evaluation:
      module: classification
      args: {topk: 1}

Errors name the key, on one line: ``ThreeDBConfigError: exp.yaml: controls[1].zoom: must be within
[0.1, 10.0], got [0.0, 1.0]``.

The flow the assets build on: ``exp = Experiment.from_file(path)``; ``jobs = exp.jobs()`` (each a
:class:`RenderJob`, small and picklable: fan them out); per chunk, ``images, records =
exp.run(chunk, model, renderer)`` with one :class:`kernels.render.Renderer` per worker
(``exp.renderer()``), or ``exp.render(chunk, renderer)`` for images only.  Records carry every
parameter as ``"<control>.<param>"`` columns.  :func:`render_training_set` renders a labelled,
seeded training set for a classifier of the rendered objects.
"""
from __future__ import annotations

import ast
import colorsys
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernels.render import (CORRUPTIONS, OBJECT_CLASSES, OCCLUDERS, TEXTURES, Renderer, SceneParams,
                            hsv_to_rgb, to_tensor)


class ThreeDBConfigError(ValueError):
    """A 3DB config was refused; the one-line message names the file and the key."""


# ------------------------------------------------------------------ controls

@dataclass(frozen=True)
class Dim:
    """A continuous parameter: its default search range ``[lo, hi]`` and the limits a config may
    ask for."""
    lo: float
    hi: float
    min: float
    max: float


@dataclass(frozen=True)
class Choice:
    """A discrete parameter: its default choices and every value a config may pick."""
    default: tuple
    allowed: tuple


class Control:
    """Base of the controls.  ``continuous``: name -> :class:`Dim`; ``discrete``: name ->
    :class:`Choice`; ``apply(scene, args)`` returns the scene with ``args`` (this control's
    parameter values by name; a missing one keeps the scene's value) applied."""
    name: str = ""
    kind: str = "pre"                  # pre: changes the 3D scene; post: the 2D image
    continuous: dict = {}
    discrete: dict = {}

    def params(self) -> tuple:
        return tuple(self.continuous) + tuple(self.discrete)

    def apply(self, scene: SceneParams, args: dict) -> SceneParams:
        raise NotImplementedError


PI = math.pi
UNIT = Dim(0.0, 1.0, 0.0, 1.0)
SIGNED = Dim(-1.0, 1.0, -1.0, 1.0)


class CameraControl(Control):
    """Camera on a sphere around the object: ``view_point_x/y/z`` is the direction from the object
    to the camera (normalized; (0, 0, 0) means (0, -1, 0)), ``zoom`` divides the distance."""
    name = "camera"
    continuous = {"view_point_x": SIGNED, "view_point_y": SIGNED, "view_point_z": Dim(0.0, 1.0, -1.0, 1.0),
                  "zoom": Dim(0.5, 2.0, 0.1, 10.0)}

    def apply(self, scene, args):
        vp = scene.view_point
        return replace(scene, view_point=tuple(float(args.get(f"view_point_{a}", vp[i])) for i, a in enumerate("xyz")),
                       zoom=float(args.get("zoom", scene.zoom)))


class OrientationControl(Control):
    """Object rotation about x, then y, then z (radians)."""
    name = "orientation"
    continuous = {f"rotation_{a}": Dim(-PI, PI, -2 * PI, 2 * PI) for a in "xyz"}

    def apply(self, scene, args):
        r = scene.rotation
        return replace(scene, rotation=tuple(float(args.get(f"rotation_{a}", r[i])) for i, a in enumerate("xyz")))


class ScaleControl(Control):
    """Object scale (1: its bounding sphere fills the frame at zoom 1)."""
    name = "scale"
    continuous = {"scale": Dim(0.25, 1.0, 0.05, 2.0)}

    def apply(self, scene, args):
        return replace(scene, scale=float(args.get("scale", scene.scale)))


class PointLightControl(Control):
    """A point light at ``distance`` along ``dir_x/y/z`` from the object; ``intensity`` is relative
    (1 lights the object well from distance 5; 3DB's Blender watts have no meaning here)."""
    name = "pointlight"
    continuous = {"intensity": Dim(0.25, 2.0, 0.0, 10.0), "distance": Dim(3.0, 10.0, 2.0, 50.0),
                  "dir_x": SIGNED, "dir_y": SIGNED, "dir_z": Dim(0.0, 1.0, -1.0, 1.0)}

    def apply(self, scene, args):
        d = scene.light_direction
        return replace(scene, light_intensity=float(args.get("intensity", scene.light_intensity)),
                       light_distance=float(args.get("distance", scene.light_distance)),
                       light_direction=(float(args.get("dir_x", d[0])), float(args.get("dir_y", d[1])),
                                        float(args.get("dir_z", d[2]))))


class MaterialControl(Control):
    """Swaps the object's texture (``own``, another class's colour, gray/white, checker, stripes)."""
    name = "material"
    discrete = {"texture": Choice(TEXTURES, TEXTURES)}

    def apply(self, scene, args):
        return replace(scene, texture=str(args.get("texture", scene.texture)))


class BackgroundControl(Control):
    """Solid background colour in HSV, composited behind the object (post-processing, as 3DB's)."""
    name = "background"
    kind = "post"
    continuous = {"H": UNIT, "S": UNIT, "V": UNIT}

    def apply(self, scene, args):
        if not args:
            return scene
        h, s, v = colorsys.rgb_to_hsv(*scene.background)
        return replace(scene, background=tuple(float(c) for c in hsv_to_rgb(
            args.get("H", h), args.get("S", s), args.get("V", v))))


class OcclusionControl(Control):
    """A square occluder pasted over the image: ``occlusion_ratio`` of its area, its corner at
    ``position_x/y`` of the free range, filled by ``occluder``."""
    name = "occlusion"
    kind = "post"
    continuous = {"occlusion_ratio": Dim(0.01, 0.8, 0.0, 1.0), "position_x": UNIT, "position_y": UNIT}
    discrete = {"occluder": Choice(OCCLUDERS, OCCLUDERS)}

    def apply(self, scene, args):
        p = scene.occlusion_position
        return replace(scene, occlusion_ratio=float(args.get("occlusion_ratio", scene.occlusion_ratio)),
                       occlusion_position=(float(args.get("position_x", p[0])), float(args.get("position_y", p[1]))),
                       occluder=str(args.get("occluder", scene.occluder)))


class ImageNetCControl(Control):
    """An ImageNet-C style corruption at ``severity`` 1..5 (0 leaves the image clean)."""
    name = "imagenet_c"
    kind = "post"
    discrete = {"corruption_name": Choice(CORRUPTIONS, CORRUPTIONS),
                "severity": Choice((1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5))}

    def apply(self, scene, args):
        sev = int(args.get("severity", scene.severity))
        name = args.get("corruption_name", scene.corruption)
        return replace(scene, corruption=name if sev else None, severity=sev if name else 0)


#: every control by its name (a config's ``module``, or the last part of 3DB's dotted module path)
CONTROLS: dict[str, Control] = {c.name: c for c in (
    CameraControl(), OrientationControl(), ScaleControl(), PointLightControl(), MaterialControl(),
    BackgroundControl(), OcclusionControl(), ImageNetCControl())}


@dataclass(frozen=True)
class ControlSpec:
    """A control as a config binds it: each parameter fixed, or searched over a range / choices."""
    name: str
    fixed: dict = field(default_factory=dict)     # param -> value
    ranges: dict = field(default_factory=dict)    # continuous param -> (lo, hi)
    choices: dict = field(default_factory=dict)   # discrete param -> tuple of values

    @property
    def control(self) -> Control:
        return CONTROLS[self.name]

    def to_config(self) -> dict:
        """The normalized config entry (ranges as [lo, hi], choices as lists)."""
        out: dict = {"module": self.name}
        for p in self.control.params():
            if p in self.fixed:
                out[p] = self.fixed[p]
            elif p in self.ranges:
                out[p] = list(self.ranges[p])
            else:
                out[p] = list(self.choices[p])
        return out


def _module_name(v: Any, kind: str) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"module: must name a {kind}, got {v!r}")
    return v.rsplit(".", 1)[-1]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def bind_control(entry: Any) -> ControlSpec:
    """One config entry (``{module: ..., <param>: value | [lo, hi] | [choices]}``) as a
    :class:`ControlSpec`; ValueError ``"<key>: <message>"`` when it is refused."""
    if not isinstance(entry, dict):
        raise ValueError(f"must be a mapping with a module key, got {entry!r}")
    if "module" not in entry:
        raise ValueError("module: required (one of " + ", ".join(CONTROLS) + ")")
    name = _module_name(entry["module"], "control")
    if name not in CONTROLS:
        near = difflib.get_close_matches(name, list(CONTROLS), n=1)
        raise ValueError(f"module: unknown control {entry['module']!r}"
                         + (f" (did you mean {near[0]}?)" if near else "")
                         + "; controls: " + ", ".join(CONTROLS))
    control = CONTROLS[name]
    fixed, ranges, choices = {}, {}, {}
    for key, v in entry.items():
        if key == "module":
            continue
        if key in control.continuous:
            dim = control.continuous[key]
            if isinstance(v, str):           # 3DB writes ranges as "(lo, hi)"
                try:
                    v = ast.literal_eval(v)
                except (ValueError, SyntaxError):
                    pass
            within = f"within [{_fmt(dim.min)}, {_fmt(dim.max)}]"
            if _number(v):
                if not dim.min <= v <= dim.max:
                    raise ValueError(f"{key}: must be {within}, got {v!r}")
                fixed[key] = float(v)
            elif isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v):
                lo, hi = float(v[0]), float(v[1])
                if not dim.min <= lo <= hi <= dim.max:
                    raise ValueError(f"{key}: must be {within}, got {list(v)}")
                if lo == hi:
                    fixed[key] = lo
                else:
                    ranges[key] = (lo, hi)
            else:
                raise ValueError(f"{key}: must be a number or a range [lo, hi] {within}, got {v!r}")
        elif key in control.discrete:
            allowed = control.discrete[key].allowed
            values = list(v) if isinstance(v, (list, tuple)) else [v]
            bad = [x for x in values if isinstance(x, bool) or x not in allowed]
            if bad or not values:
                raise ValueError(f"{key}: must be one of {', '.join(map(str, allowed))} or a list of them, "
                                 f"got {v!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: repeats a choice: {v!r}")
            if len(values) == 1:
                fixed[key] = values[0]
            else:
                choices[key] = tuple(values)
        else:
            near = difflib.get_close_matches(str(key), list(control.params()), n=1)
            raise ValueError(f"{key}: unknown key" + (f" (did you mean {near[0]}?)" if near else "")
                             + f"; {name} has {', '.join(control.params())}")
    for p, dim in control.continuous.items():
        if p not in fixed and p not in ranges:
            ranges[p] = (dim.lo, dim.hi)
    for p, ch in control.discrete.items():
        if p not in fixed and p not in choices:
            if len(ch.default) == 1:
                fixed[p] = ch.default[0]
            else:
                choices[p] = tuple(ch.default)
    return ControlSpec(name, fixed, ranges, choices)


def bind_controls(entries: Sequence[Any]) -> list[ControlSpec]:
    """Every entry bound; ValueError ``"[i].<key>: <message>"`` for the first one refused."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"must be a list of controls, got {entries!r}")
    specs, seen = [], {}
    for i, entry in enumerate(entries):
        try:
            spec = bind_control(entry)
        except ValueError as e:
            raise ValueError(f"[{i}].{e}" if re.match(r"^\w+: ", str(e)) else f"[{i}]: {e}") from None
        if spec.name in seen:
            raise ValueError(f"[{i}].module: {spec.name} is listed twice (also controls[{seen[spec.name]}])")
        seen[spec.name] = i
        specs.append(spec)
    return specs


# ------------------------------------------------------------------ search space and policies

class SearchSpace:
    """The controls' searched dimensions, in config order: ``continuous`` ((control, param, lo,
    hi), ...), ``discrete`` ((control, param, choices), ...), ``fixed`` ((control, param, value),
    ...)."""

    def __init__(self, controls: Sequence[ControlSpec]):
        self.controls = list(controls)
        self.continuous: list[tuple] = []
        self.discrete: list[tuple] = []
        self.fixed: list[tuple] = []
        for c in self.controls:
            for p in c.control.params():
                if p in c.fixed:
                    self.fixed.append((c.name, p, c.fixed[p]))
                elif p in c.ranges:
                    self.continuous.append((c.name, p, *c.ranges[p]))
                else:
                    self.discrete.append((c.name, p, c.choices[p]))

    def description(self) -> tuple[int, list[int]]:
        """(number of continuous dimensions, sizes of the discrete ones): what a policy needs."""
        return len(self.continuous), [len(ch) for _, _, ch in self.discrete]

    @property
    def names(self) -> list[str]:
        """Every parameter as ``"<control>.<param>"``, in config order (the records' columns)."""
        return [f"{c.name}.{p}" for c in self.controls for p in c.control.params()]

    def unpack(self, continuous: Sequence[float], discrete: Sequence[int]) -> dict[str, Any]:
        """A policy's point -> every parameter's value (``"<control>.<param>"``, config order):
        continuous ``lo + u (hi - lo)``, discrete ``choices[j]``, fixed ones as given."""
        if len(continuous) != len(self.continuous) or len(discrete) != len(self.discrete):
            raise ValueError(f"point has {len(continuous)} continuous and {len(discrete)} discrete values; "
                             f"the space has {len(self.continuous)} and {len(self.discrete)}")
        values: dict[str, Any] = {}
        for (c, p, lo, hi), u in zip(self.continuous, continuous):
            if not 0.0 <= u <= 1.0:
                raise ValueError(f"{c}.{p}: policy value {u} is not in [0, 1]")
            values[f"{c}.{p}"] = lo + float(u) * (hi - lo)
        for (c, p, ch), j in zip(self.discrete, discrete):
            values[f"{c}.{p}"] = ch[int(j)]
        for c, p, v in self.fixed:
            values[f"{c}.{p}"] = v
        return {k: values[k] for k in self.names}

    def scene(self, values: dict[str, Any], object: str) -> SceneParams:
        """The scene of ``object`` with every control applied to ``values`` (``unpack``'s output)."""
        scene = SceneParams(object=object)
        for c in self.controls:
            args = {p: values[f"{c.name}.{p}"] for p in c.control.params() if f"{c.name}.{p}" in values}
            scene = c.control.apply(scene, args)
        return scene


Point = tuple[tuple[float, ...], tuple[int, ...]]


class GridSearch:
    """``samples_per_dim`` values ``linspace(0, 1)`` per continuous dimension x every discrete
    combination (continuous-major, the last dimension fastest)."""

    def __init__(self, continuous_dim: int, discrete_sizes: Sequence[int], samples_per_dim: int):
        if samples_per_dim < 1:
            raise ValueError("samples_per_dim: must be >= 1")
        self.continuous_dim, self.discrete_sizes = continuous_dim, list(discrete_sizes)
        self.samples_per_dim = samples_per_dim

    def count(self) -> int:
        return self.samples_per_dim ** self.continuous_dim * int(np.prod(self.discrete_sizes, dtype=np.int64))

    def points(self) -> Iterator[Point]:
        values = [float(u) for u in np.linspace(0.0, 1.0, self.samples_per_dim)]
        for u in itertools.product(values, repeat=self.continuous_dim):
            for j in itertools.product(*[range(n) for n in self.discrete_sizes]):
                yield tuple(u), tuple(j)


class RandomSearch:
    """``samples`` points drawn uniformly (continuous in [0, 1), discrete indices) from ``seed``."""

    def __init__(self, continuous_dim: int, discrete_sizes: Sequence[int], samples: int, seed: int = 0):
        if samples < 1:
            raise ValueError("samples: must be >= 1")
        self.continuous_dim, self.discrete_sizes = continuous_dim, list(discrete_sizes)
        self.samples, self.seed = samples, seed

    def count(self) -> int:
        return self.samples

    def points(self) -> Iterator[Point]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.samples):
            u = rng.random(self.continuous_dim)
            j = [int(rng.integers(0, n)) for n in self.discrete_sizes]
            yield tuple(float(x) for x in u), tuple(j)


POLICIES = {"grid_search": GridSearch, "random_search": RandomSearch}


# ------------------------------------------------------------------ evaluator

class ClassificationEvaluator:
    """3DB's classification evaluator: per image ``is_correct`` (the label among the top-k
    logits), cross-entropy ``loss``, ``prediction`` (top-1) and ``topk`` (the k best classes)."""
    KEYS = ("is_correct", "loss", "prediction", "topk")

    def __init__(self, topk: int = 1):
        if topk < 1:
            raise ValueError("topk: must be >= 1")
        self.topk = topk

    def evaluate(self, logits: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, np.ndarray]:
        logits = torch.as_tensor(logits).float()
        labels = torch.as_tensor(labels, dtype=torch.long)
        top = logits.topk(min(self.topk, logits.shape[1]), dim=1).indices
        return {
            "is_correct": (top == labels[:, None]).any(dim=1).numpy(),
            "loss": torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy(),
            "prediction": logits.argmax(dim=1).numpy(),
            "topk": top.numpy(),
        }


EVALUATORS = {"classification": ClassificationEvaluator}


# ------------------------------------------------------------------ the config

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RenderArgs(_Section):
    engine: str = "pyrender"
    resolution: int = Field(64, ge=16, le=512)     # square images

    @field_validator("engine")
    @classmethod
    def _engine(cls, v):
        name = v.rsplit(".", 1)[-1]
        if name != "pyrender":
            raise ValueError(f"must be pyrender (the only renderer here), got {v!r}")
        return name


class PolicySpec(_Section):
    module: str
    samples_per_dim: Optional[int] = Field(None, ge=1)   # grid_search
    samples: Optional[int] = Field(None, ge=1)           # random_search
    seed: Optional[int] = Field(None, ge=0)              # random_search (default 0)

    @field_validator("module", mode="before")
    @classmethod
    def _module(cls, v):
        name = v.rsplit(".", 1)[-1] if isinstance(v, str) else v
        if name not in POLICIES:
            raise ValueError(f"must be one of {', '.join(POLICIES)}, got {v!r}")
        return name

    @model_validator(mode="after")
    def _args(self):
        if self.module == "grid_search":
            if self.samples_per_dim is None:
                raise ValueError("samples_per_dim: required for grid_search")
            for k in ("samples", "seed"):
                if getattr(self, k) is not None:
                    raise ValueError(f"{k}: not an argument of grid_search (samples_per_dim is)")
        else:
            if self.samples is None:
                raise ValueError("samples: required for random_search")
            if self.samples_per_dim is not None:
                raise ValueError("samples_per_dim: not an argument of random_search (samples and seed are)")
        return self

    def build(self, space: SearchSpace):
        d, sizes = space.description()
        if self.module == "grid_search":
            return GridSearch(d, sizes, self.samples_per_dim)
        return RandomSearch(d, sizes, self.samples, self.seed or 0)


class EvaluatorArgs(_Section):
    topk: int = Field(1, ge=1)


class EvaluationSpec(_Section):
    module: str = "classification"
    args: EvaluatorArgs = EvaluatorArgs()

    @field_validator("module", mode="before")
    @classmethod
    def _module(cls, v):
        name = v.rsplit(".", 1)[-1] if isinstance(v, str) else v
        if name not in EVALUATORS:
            raise ValueError(f"must be one of {', '.join(EVALUATORS)}, got {v!r}")
        return name


class ThreeDBConfig(_Section):
    objects: list[str] = list(OBJECT_CLASSES)     # rendered, each at every policy point
    classes: list[str] = list(OBJECT_CLASSES)     # the model's outputs in order; an object's label is its index
    render_args: RenderArgs = RenderArgs()
    policy: PolicySpec
    controls: list[dict[str, Any]] = []
    evaluation: EvaluationSpec = EvaluationSpec()

    @field_validator("objects")
    @classmethod
    def _objects(cls, v):
        if not v:
            raise ValueError("must name at least one object")
        for i, o in enumerate(v):
            if o not in OBJECT_CLASSES:
                near = difflib.get_close_matches(str(o), OBJECT_CLASSES, n=1)
                raise ValueError(f"[{i}]: unknown object {o!r}" + (f" (did you mean {near[0]}?)" if near else "")
                                 + f"; objects: {', '.join(OBJECT_CLASSES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"repeats an object: {v}")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError(f"must be at least two distinct class names, got {v}")
        return v

    @field_validator("controls", mode="before")
    @classmethod
    def _controls(cls, v):
        return [c.to_config() for c in bind_controls(v if v is not None else [])]

    @model_validator(mode="after")
    def _cross(self):
        missing = [o for o in self.objects if o not in self.classes]
        if missing:
            raise ValueError(f"classes: has no class for the objects {missing} (their labels)")
        if self.evaluation.args.topk > len(self.classes):
            raise ValueError(f"evaluation.args.topk: {self.evaluation.args.topk} exceeds the "
                             f"{len(self.classes)} classes")
        return self

    def control_specs(self) -> list[ControlSpec]:
        return bind_controls(self.controls)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _key(loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _format_errors(where: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key, msg = _key(e["loc"]), e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            m = re.match(r"^([\w\[\].]+): (.*)$", msg, re.S)
            if m:                              # the message names a key below this one
                sub, msg = m.groups()
                key = key + sub if sub.startswith("[") else (f"{key}.{sub}" if key else sub)
        if e["type"] not in ("extra_forbidden", "value_error", "missing") and "input" in e:
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{key or '<config>'}: {msg}")
    return f"{where}: " + "; ".join(p.replace("\n", " ") for p in parts)


def parse_config(data: Any, where: str = "<config>") -> ThreeDBConfig:
    """A config mapping (``base_config`` already resolved) validated; ThreeDBConfigError naming the key."""
    if not isinstance(data, dict):
        raise ThreeDBConfigError(f"{where}: the config must be a YAML mapping, got {type(data).__name__}")
    if "base_config" in data:
        raise ThreeDBConfigError(f"{where}: base_config: resolve it with load_config (a path needs a file)")
    try:
        return ThreeDBConfig.model_validate(data)
    except ValidationError as e:
        raise ThreeDBConfigError(_format_errors(where, e)) from None


def load_config_dict(path: str | Path, _chain: tuple = ()) -> dict:
    """The file's mapping over its ``base_config`` chain (each path relative to the file that names
    it); a key of a file replaces the base's whole value, as in 3DB."""
    path = Path(path)
    if not path.is_file():
        raise ThreeDBConfigError(f"{path}: no such config file")
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, real))
        raise ThreeDBConfigError(f"{path}: base_config: inherits from itself ({cycle})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ThreeDBConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ThreeDBConfigError(f"{path}: the config must be a YAML mapping, got {type(data).__name__}")
    base = data.pop("base_config", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ThreeDBConfigError(f"{path}: base_config: must be a path to a YAML file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ThreeDBConfigError(f"{path}: base_config: no such file {base_path}")
    return {**load_config_dict(base_path, (*_chain, real)), **data}


def load_config(path: str | Path) -> ThreeDBConfig:
    """A config file, its ``base_config`` chain resolved, validated."""
    return parse_config(load_config_dict(path), str(path))


# ------------------------------------------------------------------ experiments

@dataclass(frozen=True)
class RenderJob:
    """One image to render: ``object`` (label ``label``) at the policy point ``(continuous,
    discrete)``.  ``id`` numbers the experiment's jobs 0..N-1 (objects outer, points inner)."""
    id: int
    object: str
    label: int
    continuous: tuple
    discrete: tuple


class Experiment:
    """A validated config with its search space, policy and evaluator."""

    def __init__(self, config: ThreeDBConfig):
        self.config = config
        self.space = SearchSpace(config.control_specs())
        self.policy = config.policy.build(self.space)
        self.evaluator = EVALUATORS[config.evaluation.module](**config.evaluation.args.model_dump())

    @classmethod
    def from_file(cls, path: str | Path) -> "Experiment":
        return cls(load_config(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "<config>") -> "Experiment":
        return cls(parse_config(data, where))

    @property
    def size(self) -> int:
        return self.config.render_args.resolution

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    def count(self) -> int:
        """Number of jobs: objects x policy points."""
        return len(self.config.objects) * self.policy.count()

    def jobs(self) -> list[RenderJob]:
        points = list(self.policy.points())
        out = []
        for obj in self.config.objects:
            label = self.config.classes.index(obj)
            for u, j in points:
                out.append(RenderJob(len(out), obj, label, u, j))
        return out

    def params(self, job: RenderJob) -> dict[str, Any]:
        """Every parameter of the job, ``"<control>.<param>"`` -> value."""
        return self.space.unpack(job.continuous, job.discrete)

    def scene(self, job: RenderJob) -> SceneParams:
        return self.space.scene(self.params(job), job.object)

    def renderer(self) -> Renderer:
        """A renderer at the config's resolution (one per worker; close it when done)."""
        return Renderer(self.size)

    def render(self, jobs: Sequence[RenderJob], renderer: Optional[Renderer] = None) -> np.ndarray:
        """uint8 (N, H, W, 3)."""
        scenes = [self.scene(j) for j in jobs]
        if renderer is not None:
            if renderer.size != self.size:
                raise ValueError(f"renderer renders {renderer.size} px, the config asks {self.size}")
            return renderer.render_many(scenes)
        with self.renderer() as r:
            return r.render_many(scenes)

    def run(self, jobs: Sequence[RenderJob], model: Callable[[torch.Tensor], torch.Tensor],
            renderer: Optional[Renderer] = None, batch_size: int = 256,
            device: str | torch.device = "cpu") -> tuple[np.ndarray, list[dict]]:
        """3DB's worker: render the jobs, run ``model`` (float (N, 3, H, W) in [0, 1] on ``device``
        -> logits over ``classes``; normalization is the model's) and evaluate.  Returns the images
        and one record per job: ``job``, ``object``, ``label``, every parameter, and the
        evaluator's keys."""
        jobs = list(jobs)
        images = self.render(jobs, renderer)
        logits = []
        with torch.no_grad():
            for b in range(0, len(jobs), batch_size):
                logits.append(model(to_tensor(images[b:b + batch_size]).to(device)).float().cpu())
        logits = torch.cat(logits) if logits else torch.zeros(0, len(self.classes))
        if logits.shape[1] != len(self.classes):
            raise ValueError(f"the model gives {logits.shape[1]} logits; the config has {len(self.classes)} classes")
        metrics = self.evaluator.evaluate(logits, [j.label for j in jobs])
        records = []
        for i, j in enumerate(jobs):
            rec = {"job": j.id, "object": j.object, "label": j.label, **self.params(j)}
            for k in self.evaluator.KEYS:
                v = metrics[k][i]
                rec[k] = v.tolist() if isinstance(v, np.ndarray) else v.item()
            records.append(rec)
        return images, records


# ------------------------------------------------------------------ training data

#: the controls a training set is drawn over: every pose, light and view, zoom and scale within
#: reach, muted backgrounds (saturated ones, occluders, texture swaps and corruptions are left to
#: the experiments that probe them)
TRAINING_CONTROLS = (
    {"module": "camera", "zoom": [0.7, 1.5]},
    {"module": "orientation"},
    {"module": "scale", "scale": [0.5, 1.0]},
    {"module": "pointlight"},
    {"module": "background", "S": [0.0, 0.4], "V": [0.3, 0.9]},
)


def training_scenes(n: int, seed: int = 0, objects: Sequence[str] = OBJECT_CLASSES,
                    controls: Sequence[dict] = TRAINING_CONTROLS) -> tuple[list[SceneParams], np.ndarray]:
    """``n`` scenes drawn by a random search from ``seed`` over ``controls`` (config entries),
    classes balanced (``n // len(objects)`` or one more each, shuffled); labels index ``objects``."""
    try:
        specs = bind_controls(list(controls))
    except ValueError as e:
        raise ThreeDBConfigError(f"training controls: controls{e}") from None
    if not objects or any(o not in OBJECT_CLASSES for o in objects):
        raise ValueError(f"objects: must be some of {OBJECT_CLASSES}, got {objects}")
    space = SearchSpace(specs)
    d, sizes = space.description()
    labels = np.random.default_rng([seed, 1]).permutation(np.arange(n) % len(objects)).astype(np.int64)
    points = RandomSearch(d, sizes, max(n, 1), seed).points()
    scenes = [space.scene(space.unpack(*next(points)), objects[y]) for y in labels]
    return scenes, labels


def render_training_set(n: int, seed: int = 0, size: int = 64, objects: Sequence[str] = OBJECT_CLASSES,
                        controls: Sequence[dict] = TRAINING_CONTROLS,
                        renderer: Optional[Renderer] = None) -> tuple[np.ndarray, np.ndarray]:
    """A labelled training set: uint8 images (n, size, size, 3) and int64 labels (indices into
    ``objects``), the same bytes for the same arguments."""
    scenes, labels = training_scenes(n, seed, objects, controls)
    if renderer is not None:
        if renderer.size != size:
            raise ValueError(f"renderer renders {renderer.size} px, asked for {size}")
        return renderer.render_many(scenes), labels
    with Renderer(size) as r:
        return r.render_many(scenes), labels
