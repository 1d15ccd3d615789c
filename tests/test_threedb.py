"""3DB's rendering and search layer (issue 18): kernels/render.py and ops/threedb.py.

The 3D tests need a headless EGL context (pyrender on Mesa llvmpipe); without one they skip with
the reason.  Controls, policies, configs, the evaluator and the corruptions run everywhere.
"""
import math

import numpy as np
import pytest
import torch

from kernels.render import (CORRUPTIONS, OBJECT_CLASSES, SEVERITIES, SceneParams, corrupt, corrupt_reference,
                            egl_status, occlude, occluder_box, to_tensor)
from ops.threedb import (CONTROLS, ClassificationEvaluator, Experiment, GridSearch, RandomSearch, SearchSpace,
                         ThreeDBConfigError, bind_control, bind_controls, load_config, parse_config,
                         render_training_set, training_scenes)

POLICY = {"module": "grid_search", "samples_per_dim": 2}


# ------------------------------------------------------------------ controls and the search space

def test_controls_declare_ranges_within_their_limits():
    assert set(CONTROLS) == {"camera", "orientation", "scale", "pointlight", "material", "background",
                             "occlusion", "imagenet_c"}
    for c in CONTROLS.values():
        assert c.continuous or c.discrete
        for p, d in c.continuous.items():
            assert d.min <= d.lo < d.hi <= d.max, (c.name, p)
        for p, ch in c.discrete.items():
            assert set(ch.default) <= set(ch.allowed) and len(ch.default) >= 2, (c.name, p)
    o = CONTROLS["orientation"].continuous
    assert all((o[f"rotation_{a}"].lo, o[f"rotation_{a}"].hi) == (-math.pi, math.pi) for a in "xyz")
    assert (CONTROLS["camera"].continuous["zoom"].lo, CONTROLS["camera"].continuous["zoom"].hi) == (0.5, 2.0)
    assert (CONTROLS["scale"].continuous["scale"].lo, CONTROLS["scale"].continuous["scale"].hi) == (0.25, 1.0)
    assert CONTROLS["imagenet_c"].discrete["severity"].default == (1, 2, 3, 4, 5)


def test_search_space_rescales_policy_values_to_each_range():
    space = SearchSpace(bind_controls([
        {"module": "camera", "zoom": [0.5, 2.0], "view_point_x": 0, "view_point_y": "(-1, 0)"},
        {"module": "orientation", "rotation_x": 0.25, "rotation_y": 0},
        {"module": "imagenet_c", "corruption_name": ["contrast", "brightness"], "severity": 3},
    ]))
    # searched: view_point_y, view_point_z, zoom, rotation_z (config order); corruption_name
    assert [(c, p) for c, p, *_ in space.continuous] == [("camera", "view_point_y"), ("camera", "view_point_z"),
                                                         ("camera", "zoom"), ("orientation", "rotation_z")]
    assert space.description() == (4, [2])
    lo = space.unpack((0.0, 0.0, 0.0, 0.0), (0,))
    hi = space.unpack((1.0, 1.0, 1.0, 1.0), (1,))
    mid = space.unpack((0.5, 0.5, 0.5, 0.5), (1,))
    assert (lo["camera.view_point_y"], lo["camera.view_point_z"], lo["camera.zoom"]) == (-1.0, 0.0, 0.5)
    assert (hi["camera.view_point_y"], hi["camera.view_point_z"], hi["camera.zoom"]) == (0.0, 1.0, 2.0)
    assert lo["orientation.rotation_z"] == -math.pi and hi["orientation.rotation_z"] == math.pi
    assert mid["camera.zoom"] == pytest.approx(1.25) and mid["orientation.rotation_z"] == pytest.approx(0.0)
    assert lo["imagenet_c.corruption_name"] == "contrast" and hi["imagenet_c.corruption_name"] == "brightness"
    assert lo["orientation.rotation_x"] == 0.25 and lo["imagenet_c.severity"] == 3 and lo["camera.view_point_x"] == 0
    assert list(lo) == space.names and len(space.names) == 4 + 3 + 2
    scene = space.scene(mid, "mug")
    assert scene.object == "mug" and scene.zoom == pytest.approx(1.25) and scene.rotation[0] == 0.25
    assert scene.corruption == "brightness" and scene.severity == 3
    with pytest.raises(ValueError, match=r"not in \[0, 1\]"):
        space.unpack((1.5, 0, 0, 0), (0,))
    with pytest.raises(ValueError, match="point has"):
        space.unpack((0.5,), (0,))


def test_a_scalar_fixes_a_parameter_and_a_list_picks_choices():
    spec = bind_control({"module": "threedb.controls.blender.occlusion", "occlusion_ratio": 0.3,
                         "occluder": ["black", "noise"], "position_x": [0.2, 0.2]})
    assert spec.name == "occlusion"
    assert spec.fixed == {"occlusion_ratio": 0.3, "position_x": 0.2}
    assert spec.ranges == {"position_y": (0.0, 1.0)} and spec.choices == {"occluder": ("black", "noise")}
    wide = bind_control({"module": "camera", "view_point_z": [-1, 1]})   # beyond the default range, within limits
    assert wide.ranges["view_point_z"] == (-1.0, 1.0)
    off = bind_control({"module": "imagenet_c", "severity": [0, 5]})   # severity 0: clean
    space = SearchSpace([off])
    clean = space.scene(space.unpack((), (0, 0)), "ball")
    assert clean.corruption is None and clean.severity == 0


# ------------------------------------------------------------------ policies

@pytest.mark.parametrize("spd,d,sizes", [(3, 2, []), (2, 3, [2, 5]), (4, 1, [3]), (1, 2, [2]), (5, 0, [2, 2])])
def test_grid_policy_is_the_full_product(spd, d, sizes):
    policy = GridSearch(d, sizes, spd)
    points = list(policy.points())
    assert policy.count() == len(points) == spd ** d * int(np.prod(sizes))
    assert len(set(points)) == len(points)
    u = np.array([p[0] for p in points]).reshape(len(points), d)
    assert ((u >= 0) & (u <= 1)).all()
    if d:
        assert sorted(set(u[:, 0])) == pytest.approx(list(np.linspace(0, 1, spd)))
    for j in (p[1] for p in points):
        assert len(j) == len(sizes) and all(0 <= a < n for a, n in zip(j, sizes))


def test_random_policy_is_seeded():
    a = list(RandomSearch(3, [4, 2], 50, seed=7).points())
    b = list(RandomSearch(3, [4, 2], 50, seed=7).points())
    c = list(RandomSearch(3, [4, 2], 50, seed=8).points())
    assert a == b and a != c and len(a) == RandomSearch(3, [4, 2], 50).count() == 50
    u = np.array([p[0] for p in a])
    assert ((u >= 0) & (u < 1)).all() and u.std() > 0.2
    j = np.array([p[1] for p in a])
    assert set(j[:, 0]) == {0, 1, 2, 3} and set(j[:, 1]) == {0, 1}


# ------------------------------------------------------------------ configs

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_inherits_from_its_base_config(tmp_path):
    _write(tmp_path / "bases" / "root.yaml", """
objects: [crate, ball]
render_args: {resolution: 32}
policy: {module: threedb.policies.random_search, samples: 4, seed: 3}
evaluation: {module: threedb.evaluators.classification, args: {topk: 2}}
""")
    _write(tmp_path / "bases" / "mid.yaml", """
base_config: root.yaml
controls:
  - module: orientation
""")
    child = _write(tmp_path / "exp" / "child.yaml", """
base_config: ../bases/mid.yaml
policy:
  module: grid_search
  samples_per_dim: 3
controls:
  - module: camera
    zoom: (0.7, 1.3)
    view_point_x: 0
    view_point_y: -1
    view_point_z: 0.3
""")
    cfg = load_config(child)
    assert cfg.objects == ["crate", "ball"] and cfg.render_args.resolution == 32   # from root
    assert cfg.evaluation.args.topk == 2
    assert cfg.policy.module == "grid_search" and cfg.policy.samples_per_dim == 3   # replaced whole (3DB)
    assert cfg.policy.samples is None
    assert [c["module"] for c in cfg.controls] == ["camera"] and cfg.controls[0]["zoom"] == [0.7, 1.3]
    exp = Experiment(cfg)
    assert exp.count() == 2 * 3 and len(exp.jobs()) == 6
    assert load_config(tmp_path / "bases" / "mid.yaml").policy.module == "random_search"
    assert parse_config(cfg.model_dump()).digest() == cfg.digest()     # the normalized form validates again

    _write(tmp_path / "a.yaml", "base_config: b.yaml\npolicy: {module: grid_search, samples_per_dim: 2}\n")
    _write(tmp_path / "b.yaml", "base_config: a.yaml\n")
    with pytest.raises(ThreeDBConfigError, match="base_config: inherits from itself"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", "base_config: nowhere.yaml\n")
    with pytest.raises(ThreeDBConfigError, match=r"c.yaml: base_config: no such file .*nowhere.yaml"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("data,message", [
    ({"controls": [{"module": "orientation"}, {"module": "camera", "zoom": [0, 1]}]},
     "controls[1].zoom: must be within [0.1, 10], got [0, 1]"),
    ({"controls": [{"module": "camera", "zoomm": 1}]}, "controls[0].zoomm: unknown key (did you mean zoom?)"),
    ({"controls": [{"module": "camra"}]}, "controls[0].module: unknown control 'camra' (did you mean camera?)"),
    ({"controls": [{"zoom": 1}]}, "controls[0].module: required"),
    ({"controls": [{"module": "scale"}, {"module": "scale"}]}, "controls[1].module: scale is listed twice"),
    ({"controls": [{"module": "imagenet_c", "severity": [1, 7]}]}, "controls[0].severity: must be one of 0, 1"),
    ({"controls": [{"module": "material", "texture": "plaid"}]}, "controls[0].texture: must be one of own"),
    ({"controls": [{"module": "orientation", "rotation_z": "sideways"}]}, "controls[0].rotation_z: must be a number"),
    ({"controls": ["camera"]}, "controls[0]: must be a mapping"),
    ({"policy": {"module": "grid_search"}}, "policy.samples_per_dim: required for grid_search"),
    ({"policy": {"module": "grid_search", "samples_per_dim": 2, "seed": 1}}, "policy.seed: not an argument"),
    ({"policy": {"module": "random_search", "samples": 0}}, "policy.samples: Input should be greater than"),
    ({"policy": {"module": "annealing", "samples": 3}}, "policy.module: must be one of grid_search, random_search"),
    ({"objects": ["crate", "cup"]}, "objects[1]: unknown object 'cup'"),
    ({"objects": ["cone"], "classes": ["crate", "mug"]}, "classes: has no class for the objects ['cone']"),
    ({"render_args": {"resolution": 8}}, "render_args.resolution: Input should be greater than or equal to 16"),
    ({"render_args": {"engine": "blender"}}, "render_args.engine: must be pyrender"),
    ({"evaluation": {"args": {"topk": 7}}}, "evaluation.args.topk: 7 exceeds the 6 classes"),
    ({"evaluation": {"module": "detection"}}, "evaluation.module: must be one of classification"),
    ({"inference": {"class": "resnet18"}}, "inference: unknown key"),
])
def test_config_errors_name_the_key_on_one_line(data, message):
    with pytest.raises(ThreeDBConfigError) as e:
        parse_config({"policy": POLICY, **data}, "exp.yaml")
    text = str(e.value)
    assert text.startswith("exp.yaml: ") and message in text, text
    assert "\n" not in text


def test_config_file_errors(tmp_path):
    with pytest.raises(ThreeDBConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ThreeDBConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "policy: [unclosed\n"))
    with pytest.raises(ThreeDBConfigError, match="policy: required"):
        load_config(_write(tmp_path / "empty.yaml", ""))
    with pytest.raises(ThreeDBConfigError, match="must be a YAML mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n"))


# ------------------------------------------------------------------ evaluator

def test_classification_evaluator_topk_loss_prediction():
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 5.0]])
    labels = [1, 2, 1]
    top1 = ClassificationEvaluator(1).evaluate(logits, labels)
    top2 = ClassificationEvaluator(2).evaluate(logits, labels)
    assert top1["prediction"].tolist() == [0, 2, 2]
    assert top1["is_correct"].tolist() == [False, True, False]
    assert top2["is_correct"].tolist() == [True, True, False]
    assert top2["topk"].tolist() == [[0, 1], [2, 1], [2, 0]]
    expected = [-torch.log_softmax(logits[i], 0)[y].item() for i, y in enumerate(labels)]
    np.testing.assert_allclose(top1["loss"], expected, rtol=1e-6)


# ------------------------------------------------------------------ corruptions (no rendering)

def _image(size=40, flip=False):
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.stack([0.15 + 0.4 * xx, 0.25 + 0.3 * yy, 0.55 - 0.3 * xx * yy], -1)
    img[size // 5:size // 2, size // 4:size // 2 + 3] = (0.75, 0.1, 0.2)     # an edge for the blur
    img[-8:, -8:] = 0.0                                                    # black: brightness's grey case
    return img[::-1].copy() if flip else img


def test_batched_corruption_agrees_with_the_per_image_reference():
    imgs = np.stack([_image(), _image(flip=True)] * 6)
    names = [None, "gaussian_noise", "gaussian_blur", "contrast", "brightness", "gaussian_blur",
             "gaussian_noise", "brightness", "contrast", None, "gaussian_blur", "gaussian_noise"]
    sev = [0, 1, 5, 2, 4, 2, 5, 1, 5, 3, 3, 3]
    seeds = list(range(100, 112))
    fast = corrupt(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), names, sev, seeds).permute(0, 2, 3, 1).numpy()
    for i in range(len(imgs)):
        ref = corrupt_reference(imgs[i], names[i], sev[i], seeds[i])
        np.testing.assert_allclose(fast[i], ref, atol=2e-6, err_msg=f"{names[i]} severity {sev[i]}")
    assert np.abs(fast[0] - imgs[0]).max() < 1e-6 and (fast >= 0).all() and (fast <= 1).all()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_severity_corrupts_more(name):
    img = _image(48)
    x = torch.from_numpy(np.stack([img] * 5)).permute(0, 3, 1, 2).float()
    out = corrupt(x, name, [1, 2, 3, 4, 5], 3).permute(0, 2, 3, 1).numpy()
    dist = [float(np.sqrt(((o - img) ** 2).mean())) for o in out]
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    assert dist[0] > 1e-3
    assert len(SEVERITIES[name]) == 5


def test_occluder_covers_its_ratio_inside_the_image():
    for size in (32, 64, 128):
        for ratio in (0.01, 0.25, 0.8):
            for pos in ((0, 0), (1, 1), (0.3, 0.9)):
                y0, y1, x0, x1 = occluder_box(size, ratio, pos)
                assert 0 <= y0 < y1 <= size and 0 <= x0 < x1 <= size
                assert abs((y1 - y0) * (x1 - x0) / size ** 2 - ratio) < 2.5 / size
    img = np.full((32, 32, 3), 0.5, np.float32)
    out = occlude(img, 0.25, (1, 0), "black")
    assert (out[:16, 16:] == 0).all() and (out[16:, :] == 0.5).all() and (img == 0.5).all()
    a, b = occlude(img, 0.25, (0, 0), "noise", seed=1), occlude(img, 0.25, (0, 0), "noise", seed=1)
    assert (a == b).all() and a[:16, :16].std() > 0.2


# ------------------------------------------------------------------ rendering

@pytest.fixture(scope="module")
def egl():
    reason = egl_status()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def r32(egl):
    from kernels.render import Renderer

    with Renderer(32) as r:
        yield r


def _object_mask(img, bg):
    return np.abs(img.astype(int) - np.array(bg)).sum(-1) > 12


def test_renders_are_deterministic(r32):
    from kernels.render import Renderer

    scene = SceneParams(object="mug", rotation=(0.3, -0.2, 1.1), zoom=1.2, background=(0.2, 0.4, 0.3),
                        occlusion_ratio=0.1, occluder="noise", corruption="gaussian_noise", severity=2)
    first = r32.render(scene)
    r32.render_many([SceneParams(object=o, texture="checker") for o in OBJECT_CLASSES])   # other state in between
    again = r32.render(scene)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert first.tobytes() == again.tobytes()
    with Renderer(32) as fresh:                       # a new context, meshes uploaded in another order
        fresh.render(SceneParams(object="ball"))
        assert fresh.render(scene).tobytes() == first.tobytes()
    other = r32.render(SceneParams(**{**scene.__dict__, "rotation": (0.3, -0.2, 1.2)}))
    assert other.tobytes() != first.tobytes()
    # the batched 2D stages give what one-by-one rendering gives
    scenes = [scene, SceneParams(object="cone", corruption="gaussian_blur", severity=4),
              SceneParams(object="torus"), SceneParams(object="crate", corruption="brightness", severity=1)]
    batch = r32.render_many(scenes)
    for s, img in zip(scenes, batch):
        assert img.tobytes() == r32.render(s).tobytes()


def test_scene_parameters_change_the_render(egl):
    from kernels.render import Renderer

    for size in (64, 128):
        with Renderer(size) as r:
            bg = (0.5, 0.5, 0.5)
            base = r.render(SceneParams(object="ball", background=bg))
            assert base.shape == (size, size, 3)
            grey = tuple(int(round(255 * c)) for c in bg)
            assert tuple(base[0, 0]) == grey                                  # a corner shows the background
            small = _object_mask(r.render(SceneParams(object="ball", zoom=0.6, background=bg)), grey).mean()
            big = _object_mask(r.render(SceneParams(object="ball", zoom=1.0, background=bg)), grey).mean()
            half = SceneParams(object="ball", zoom=1.0, scale=0.5, background=bg)
            smaller = _object_mask(r.render(half), grey).mean()
            assert 0.05 < small < big < 0.9 and smaller < big / 2
            assert abs(big / small - (1 / 0.6) ** 2) < 0.6                    # area ~ zoom^2
    with Renderer(32) as r:
        mask = _object_mask(r.render(SceneParams(object="ball")), (128, 128, 128))
        red = r.render(SceneParams(object="ball"))[mask].mean(0)
        green = r.render(SceneParams(object="ball", texture="capsule"))[mask].mean(0)
        assert red[0] > 2 * red[1] and green[1] > 2 * green[0]              # texture swap
        lit = r.render(SceneParams(object="ball"))[mask].mean()
        dim = r.render(SceneParams(object="ball", light_intensity=0.25))[mask].mean()
        behind = r.render(SceneParams(object="ball", light_direction=(0, 1, 0)))[mask].mean()
        assert dim < lit - 10 and behind < lit - 10                          # the point light
        top = r.render(SceneParams(object="mug", view_point=(0, 0, 1)))
        side = r.render(SceneParams(object="mug", view_point=(1, 0, 0)))
        assert top.tobytes() != side.tobytes()
        occ = r.render(SceneParams(object="ball", occlusion_ratio=0.25, occlusion_position=(0.5, 0.5),
                                   occluder="black"))
        assert (occ[8:24, 8:24] == 0).all()


def test_renders_get_more_corrupted_with_severity(r32):
    clean = r32.render(SceneParams(object="torus", background=(0.3, 0.5, 0.7))).astype(float)
    for name in CORRUPTIONS:
        imgs = r32.render_many([SceneParams(object="torus", background=(0.3, 0.5, 0.7), corruption=name,
                                            severity=s) for s in range(1, 6)]).astype(float)
        dist = [np.sqrt(((i - clean) ** 2).mean()) for i in imgs]
        assert all(a < b for a, b in zip(dist, dist[1:])), (name, dist)


def test_small_grid_end_to_end_with_the_classification_evaluator(egl, tmp_path):
    cfg = _write(tmp_path / "grid.yaml", """
objects: [crate, ball]
classes: [crate, mug, ball, cone, torus, capsule]
render_args: {resolution: 32}
policy: {module: grid_search, samples_per_dim: 3}
controls:
  - module: orientation
    rotation_x: 0
    rotation_y: 0
  - module: camera
    view_point_x: 0
    view_point_y: -1
    view_point_z: 0.3
    zoom: [0.7, 1.3]
  - module: background
    H: 0
    S: 0
    V: 0.5
evaluation: {module: classification, args: {topk: 2}}
""")
    exp = Experiment.from_file(cfg)
    jobs = exp.jobs()
    assert exp.space.description() == (2, []) and exp.count() == len(jobs) == 2 * 3 * 3
    assert [j.id for j in jobs] == list(range(18)) and {j.label for j in jobs} == {0, 2}

    # a trivially constructed model: the mean colour of the image's centre, compared with each
    # class's colour by direction (constant logits for classes 0 and 1 as a tie-break check)
    from kernels.render import COLOURS

    protos = torch.tensor([COLOURS[c] for c in exp.classes]) ** (1 / 2.2)
    protos = protos / protos.norm(dim=1, keepdim=True)

    def model(x):
        c = x[:, :, 12:20, 12:20].mean(dim=(2, 3))
        return 20 * (c / c.norm(dim=1, keepdim=True)) @ protos.T

    with exp.renderer() as r:
        images, records = exp.run(jobs, model, r, batch_size=7)
        assert exp.render(jobs[:3], r).tobytes() == images[:3].tobytes()
    assert images.shape == (18, 32, 32, 3) and len(records) == 18
    rec = records[4]
    assert set(rec) == {"job", "object", "label", *exp.space.names, "is_correct", "loss", "prediction", "topk"}
    grid = {(round(r["orientation.rotation_z"], 6), round(r["camera.zoom"], 6)) for r in records}
    assert grid == {(round(a, 6), round(z, 6)) for a in (-math.pi, 0.0, math.pi) for z in (0.7, 1.0, 1.3)}
    logits = model(to_tensor(images))
    for r in records:
        assert r["prediction"] == int(logits[r["job"]].argmax())
        assert r["is_correct"] == (r["label"] in r["topk"]) and len(r["topk"]) == 2
        assert r["loss"] == pytest.approx(-torch.log_softmax(logits[r["job"]], 0)[r["label"]].item(), rel=1e-5)
    assert all(r["is_correct"] for r in records)        # crate is brown, ball red: the model sees it
    constant = lambda x: torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0]]).expand(len(x), -1)   # noqa: E731
    _, recs = exp.run(jobs, constant, batch_size=18)
    assert [r["is_correct"] for r in recs] == [r["object"] == "crate" for r in recs]
    assert {r["prediction"] for r in recs} == {0}


def test_training_set_is_seeded_and_balanced(r32):
    x, y = render_training_set(14, seed=5, size=32, renderer=r32)
    x2, y2 = render_training_set(14, seed=5, size=32, renderer=r32)
    x3, _ = render_training_set(14, seed=6, size=32, renderer=r32)
    assert x.shape == (14, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert x.tobytes() == x2.tobytes() and (y == y2).all() and x.tobytes() != x3.tobytes()
    assert np.bincount(y, minlength=6).tolist() in ([3, 3, 2, 2, 2, 2], sorted([3, 3, 2, 2, 2, 2]))
    scenes, labels = training_scenes(14, seed=5)
    assert [s.object for s in scenes] == [OBJECT_CLASSES[i] for i in labels]
    assert len({s.rotation for s in scenes}) == 14 and all(0.7 <= s.zoom <= 1.5 for s in scenes)
    with pytest.raises(ThreeDBConfigError, match=r"training controls: controls\[0\].zoom"):
        training_scenes(3, controls=[{"module": "camera", "zoom": 50}])
