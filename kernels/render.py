"""Headless rendering for the 3DB study (issue 18): procedural objects rendered in 3D on the CPU,
2D compositing (background, occluder) and ImageNet-C style corruptions.

The pipeline for one image, all of it a pure function of a :class:`SceneParams`:

1. **3D** (pyrender on EGL; on a machine without a GPU, Mesa's llvmpipe rasterizer): one of the
   procedural objects of :data:`OBJECT_CLASSES` (trimesh primitives, normalized to a bounding
   sphere of radius 1 at the origin, z up), in its own colour or a swapped texture
   (:data:`TEXTURES`), rotated (``rotation``, Euler angles applied x, then y, then z, as Blender's
   XYZ mode), scaled (``scale``), seen from ``view_point`` (a direction; the camera looks at the
   origin from ``CAMERA_DISTANCE / zoom``, so at zoom 1 and scale 1 the bounding sphere just fills
   the frame), lit by a point light (``light_intensity``, ``light_direction``,
   ``light_distance``) and a little ambient light, on a transparent background (4x multisampled, so
   the object's edges carry fractional alpha).
2. **Background** (as 3DB's post-processing control): ``rgb + (1 - alpha) * background``.
3. **Occlusion** (2D): a square patch covering ``occlusion_ratio`` of the image, placed by
   ``occlusion_position`` (0: left/top edge, 1: right/bottom edge), filled by ``occluder``.
4. **Corruption**: one of :data:`CORRUPTIONS` at ``severity`` 1-5 (0: none).
5. Quantized to uint8.

Renders are deterministic: the same :class:`SceneParams` gives the same bytes, whatever was
rendered before (the noise of ``gaussian_noise`` and of the ``noise`` occluder is drawn from
``scene.seed``, by default a hash of the scene's fields).

Fast paths and their references: :func:`corrupt` (a batch of images, each with its own corruption,
severity and seed, in torch) against :func:`corrupt_reference` (one image, numpy, written out from
the ImageNet-C definitions; brightness through an explicit per-pixel HSV round trip).

**Environment**: ``PYOPENGL_PLATFORM=egl`` must be set before OpenGL is first imported; this module
sets it (``setdefault``) when it is imported, so import it before anything that imports OpenGL.
System libraries: ``libegl1 libegl-mesa0 libgl1`` (Debian).  :func:`egl_status` says whether a
context can be made here.
"""
from __future__ import annotations

import colorsys
import dataclasses
import math
import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from kernels.npyio import Closing as _Closing

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

# ------------------------------------------------------------------ objects and textures

#: the renderable object classes, in label order (a classifier trained on
#: ``ops.threedb.render_training_set`` predicts these indices)
OBJECT_CLASSES = ("crate", "mug", "ball", "cone", "torus", "capsule")

#: each class's own colour (linear RGB; the renderer's output is gamma-encoded)
COLOURS = {
    "crate": (0.45, 0.22, 0.06),     # brown
    "mug": (0.12, 0.30, 0.90),       # blue
    "ball": (0.85, 0.06, 0.06),      # red
    "cone": (0.95, 0.45, 0.00),      # orange
    "torus": (0.85, 0.80, 0.08),     # yellow
    "capsule": (0.08, 0.60, 0.18),   # green
}

#: discrete texture swaps: ``own`` (the class's colour), any class's colour by its name
#: (texture-bias experiments), solid ``gray``/``white``, and two patterns
TEXTURES = ("own",) + OBJECT_CLASSES + ("gray", "white", "checker", "stripes")

OCCLUDERS = ("gray", "black", "white", "noise", "checker")

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "brightness")

#: per severity 1..5.  Noise, contrast and brightness: ImageNet-C's values (Hendrycks & Dietterich
#: 2019).  Blur: Gaussian sigma in pixels of a 64-pixel image (scaled with the image size); ImageNet-C's
#: [1, 2, 3, 4, 6] at 224 px would barely show at 64 px.
SEVERITIES = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),    # noise std
    "gaussian_blur": (0.5, 0.75, 1.0, 1.5, 2.0),          # sigma at 64 px
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),               # factor towards each channel's mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),              # added to HSV value
}

YFOV = math.pi / 4
CAMERA_DISTANCE = 1.0 / math.sin(YFOV / 2)   # a unit sphere fills the frame at zoom 1
LIGHT_SCALE = 25.0 * math.pi                 # candela of intensity 1 (well lit at distance 5)
SIZES = (16, 512)                            # render sizes allowed (square, inclusive)


@dataclass(frozen=True)
class SceneParams:
    """Everything one image depends on.  Defaults: a front view slightly from above, lit from the
    upper left front, on a mid-gray background, no occluder, no corruption."""
    object: str = "crate"
    texture: str = "own"
    view_point: tuple = (0.0, -1.0, 0.35)     # direction from the object to the camera
    zoom: float = 1.0
    rotation: tuple = (0.0, 0.0, 0.0)         # radians about x, y, z
    scale: float = 1.0
    light_intensity: float = 1.0              # relative: 1 lights the object well from distance 5
    light_direction: tuple = (-0.5, -1.0, 1.0)
    light_distance: float = 5.0
    ambient: float = 0.25
    background: tuple = (0.5, 0.5, 0.5)       # RGB in [0, 1]
    occlusion_ratio: float = 0.0              # share of the image covered; 0: no occluder
    occlusion_position: tuple = (0.5, 0.5)    # (x, y) in [0, 1]
    occluder: str = "gray"
    corruption: Optional[str] = None
    severity: int = 0                         # 1..5 with a corruption
    seed: Optional[int] = None                # noise seed; None: a hash of the other fields

    def __post_init__(self):
        if self.object not in OBJECT_CLASSES:
            raise ValueError(f"object: {self.object!r} is not one of {OBJECT_CLASSES}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture: {self.texture!r} is not one of {TEXTURES}")
        if self.occluder not in OCCLUDERS:
            raise ValueError(f"occluder: {self.occluder!r} is not one of {OCCLUDERS}")
        if self.corruption is not None and self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption: {self.corruption!r} is not one of {CORRUPTIONS}")
        if self.corruption is not None and not 1 <= self.severity <= 5:
            raise ValueError(f"severity: must be 1..5 with a corruption, got {self.severity}")
        if not 0 <= self.occlusion_ratio <= 1:
            raise ValueError(f"occlusion_ratio: must be in [0, 1], got {self.occlusion_ratio}")
        if self.zoom <= 0 or self.scale <= 0 or self.light_distance <= 0:
            raise ValueError("zoom, scale and light_distance: must be > 0")

    def noise_seed(self) -> int:
        """``seed``, or a stable hash of the other fields (the same scene always draws the same noise)."""
        if self.seed is not None:
            return int(self.seed)
        fields = dataclasses.astuple(dataclasses.replace(self, seed=None))
        return zlib.crc32(repr(fields).encode())


def _normalized(mesh):
    """Centred at its bounding box's centre, scaled to a bounding sphere of radius 1."""
    mesh = mesh.copy()
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(1.0 / np.linalg.norm(mesh.vertices, axis=1).max())
    return mesh


def object_mesh(name: str, max_edge: Optional[float] = None):
    """The procedural trimesh of an object class (z up, bounding sphere of radius 1); with
    ``max_edge``, subdivided until no edge is longer (fine enough for face-wise texture patterns;
    llvmpipe's cost grows with the vertex count, so solid colours use the coarse mesh)."""
    import trimesh
    from trimesh import creation, transformations as tf

    if name == "crate":
        mesh = creation.box(extents=(1.5, 1.0, 0.9))
    elif name == "mug":
        body = creation.cylinder(radius=0.5, height=1.1, sections=40)
        handle = creation.torus(major_radius=0.28, minor_radius=0.08, major_sections=32, minor_sections=12)
        handle.apply_transform(tf.rotation_matrix(math.pi / 2, (1, 0, 0)))   # in the xz plane
        handle.apply_translation((0.55, 0.0, 0.0))
        mesh = trimesh.util.concatenate([body, handle])
    elif name == "ball":
        mesh = creation.icosphere(subdivisions=3, radius=1.0)
    elif name == "cone":
        mesh = creation.cone(radius=0.65, height=1.5, sections=40)
    elif name == "torus":
        mesh = creation.torus(major_radius=0.7, minor_radius=0.28, major_sections=48, minor_sections=20)
    elif name == "capsule":
        mesh = creation.capsule(height=1.2, radius=0.35, count=(24, 24))
    else:
        raise ValueError(f"object: {name!r} is not one of {OBJECT_CLASSES}")
    mesh = _normalized(mesh)
    if max_edge is None:
        return mesh
    v, f = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=max_edge)
    return trimesh.Trimesh(v, f, process=True)


PATTERN_EDGE = 0.15     # max edge of the meshes drawn with a pattern


def solid_colour(object_name: str, texture: str) -> Optional[tuple]:
    """The linear RGB of the object under a solid ``texture``; None for a pattern."""
    if texture == "own":
        return COLOURS[object_name]
    if texture in COLOURS:
        return COLOURS[texture]
    if texture in ("gray", "white"):
        return (0.35,) * 3 if texture == "gray" else (0.9,) * 3
    return None


def pattern_colours(mesh, texture: str) -> np.ndarray:
    """(faces, 3) linear RGB of a pattern ``texture`` (``checker``: a 3D checkerboard, ``stripes``:
    bands along z), face by face from the centroids, so the pattern's edges stay sharp."""
    n = len(mesh.faces)
    c = mesh.triangles_center
    if texture not in ("checker", "stripes"):
        raise ValueError(f"texture: {texture!r} is not a pattern")
    if texture == "checker":
        on = np.floor(c * 3.0 + 10.0).astype(int).sum(axis=1) % 2 == 0
        return np.where(on[:, None], 0.9, 0.03) * np.ones((n, 3))
    # stripes: bands along z, magenta and cyan
    on = np.floor(c[:, 2] * 4.0 + 10.0).astype(int) % 2 == 0
    return np.where(on[:, None], np.array([[0.8, 0.05, 0.7]]), np.array([[0.05, 0.7, 0.8]]))


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _unit(v, default) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    return np.asarray(default, dtype=np.float64) if n < 1e-9 else v / n


def look_at(eye: np.ndarray) -> np.ndarray:
    """4x4 camera-to-world pose of a camera at ``eye`` looking at the origin, z up (OpenGL camera:
    looking down its -z, y up)."""
    f = -eye / np.linalg.norm(eye)
    up = np.array([0.0, 0.0, 1.0])
    if abs(f @ up) > 0.999:            # looking straight down or up: y is "up" in the image
        up = np.array([0.0, 1.0, 0.0])
    right = np.cross(f, up)
    right /= np.linalg.norm(right)
    true_up = np.cross(right, f)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, true_up, -f, eye
    return pose


def object_pose(scene: SceneParams) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = _rotation(*scene.rotation) * scene.scale
    return pose


def camera_pose(scene: SceneParams) -> np.ndarray:
    return look_at(_unit(scene.view_point, (0.0, -1.0, 0.0)) * CAMERA_DISTANCE / scene.zoom)


def light_pose(scene: SceneParams) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, 3] = _unit(scene.light_direction, (0.0, 0.0, 1.0)) * scene.light_distance
    return pose


# ------------------------------------------------------------------ the renderer

_EGL_STATUS: dict = {}


def egl_status() -> Optional[str]:
    """None when a headless EGL context can be made here, else why not (for skipping tests)."""
    if "status" not in _EGL_STATUS:
        try:
            with Renderer(16) as r:
                r.render(SceneParams())
            _EGL_STATUS["status"] = None
        except Exception as e:   # noqa: BLE001 - any failure means no rendering here
            _EGL_STATUS["status"] = f"no headless EGL rendering ({type(e).__name__}: {e}); needs " \
                                    "PYOPENGL_PLATFORM=egl, pyrender, and libegl1 libegl-mesa0 libgl1"
    return _EGL_STATUS["status"]


class _EGLRenderer(_Closing):
    """The 3D stage in this process: one EGL context; each (object, texture) mesh uploaded the first
    time it is drawn.  Used only inside a render server process (:class:`Renderer`): a process that
    has initialized Mesa's EGL crashes in PyTorch's CPU kernels afterwards (measured: a plain conv
    training step segfaults after one render in the same process), so rendering never shares a
    process with training or inference."""

    def __init__(self, size: int = 64):
        self._gl = None
        if not SIZES[0] <= size <= SIZES[1]:
            raise ValueError(f"size: must be in {SIZES[0]}..{SIZES[1]}, got {size}")
        if os.environ.get("PYOPENGL_PLATFORM") != "egl":
            raise RuntimeError("PYOPENGL_PLATFORM must be 'egl' (set before OpenGL is imported)")
        import pyrender

        self._pr = pyrender
        self.size = int(size)
        self._gl = pyrender.OffscreenRenderer(self.size, self.size)
        self._scene = pyrender.Scene(bg_color=(0.0, 0.0, 0.0, 0.0), ambient_light=(0.25, 0.25, 0.25))
        self._camera = self._scene.add(pyrender.PerspectiveCamera(yfov=YFOV, znear=0.05, zfar=100.0),
                                       pose=np.eye(4))
        self._light = pyrender.PointLight(color=np.ones(3), intensity=LIGHT_SCALE)
        self._light_node = self._scene.add(self._light, pose=np.eye(4))
        self._nodes: dict = {}       # (object, texture) -> node, visible only when drawn
        self._meshes: dict = {}      # (object, fine) -> trimesh
        self.frames = 0

    # -- 3D

    def _mesh(self, obj: str, fine: bool):
        key = (obj, fine)
        if key not in self._meshes:
            # vertices split at sharp edges: flat box faces and cylinder caps, smooth elsewhere
            self._meshes[key] = object_mesh(obj, PATTERN_EDGE if fine else None).smooth_shaded
        return self._meshes[key]

    def _node(self, obj: str, texture: str):
        key = (obj, texture)
        if key not in self._nodes:
            colour = solid_colour(obj, texture)
            tm = self._mesh(obj, colour is None)
            if colour is not None:      # indexed, one colour: the material's
                kw = dict(positions=tm.vertices, normals=tm.vertex_normals, indices=tm.faces)
                base = (*colour, 1.0)
            else:                       # one vertex per face corner, each face its own colour
                rgb = np.repeat(pattern_colours(tm, texture), 3, axis=0)
                kw = dict(positions=tm.vertices[tm.faces].reshape(-1, 3),
                          normals=tm.vertex_normals[tm.faces].reshape(-1, 3),
                          color_0=np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1))
                base = (1.0, 1.0, 1.0, 1.0)
            kw = {k: np.ascontiguousarray(v, dtype=np.uint32 if k == "indices" else np.float32)
                  for k, v in kw.items()}
            prim = self._pr.Primitive(**kw, mode=4,   # GL_TRIANGLES
                                      material=self._pr.MetallicRoughnessMaterial(
                                          baseColorFactor=base, metallicFactor=0.0, roughnessFactor=0.75))
            mesh = self._pr.Mesh(primitives=[prim], is_visible=False)
            self._nodes[key] = self._scene.add(mesh, pose=np.eye(4))
        return self._nodes[key]

    def render_rgba(self, scene: SceneParams) -> np.ndarray:
        """The 3D stage: float32 (H, W, 4), colour premultiplied by alpha (0 off the object)."""
        node = self._node(scene.object, scene.texture)
        for other in self._nodes.values():
            other.mesh.is_visible = other is node
        self._scene.set_pose(node, object_pose(scene))
        self._scene.set_pose(self._camera, camera_pose(scene))
        self._scene.set_pose(self._light_node, light_pose(scene))
        self._light.intensity = LIGHT_SCALE * float(scene.light_intensity)
        self._scene.ambient_light = np.full(3, float(scene.ambient))
        colour, _ = self._gl.render(self._scene, flags=self._pr.RenderFlags.RGBA)
        self.frames += 1
        return colour.astype(np.float32) / 255.0

    def close(self):
        """Frees this renderer's GL objects and destroys its context.  Unlike pyrender's
        ``OffscreenRenderer.delete`` it does not terminate the EGL display, which every renderer of
        the process shares (terminating it kills the others' contexts)."""
        gl, self._gl = self._gl, None
        if gl is None:
            return
        from OpenGL.EGL import EGL_NO_CONTEXT, EGL_NO_SURFACE, eglDestroyContext, eglMakeCurrent

        platform = gl._platform
        platform.make_current()
        gl._renderer.delete()
        eglMakeCurrent(platform._egl_display, EGL_NO_SURFACE, EGL_NO_SURFACE, EGL_NO_CONTEXT)
        eglDestroyContext(platform._egl_display, platform._egl_context)
        # pyrender's own __del__ would terminate the shared display: leave it nothing to act on
        platform._egl_context = platform._egl_display = None



def _serve(conn, size: int) -> None:
    """The render server: an :class:`_EGLRenderer` answering lists of scenes with RGBA stacks."""
    os.environ["PYOPENGL_PLATFORM"] = "egl"
    try:
        r = _EGLRenderer(size)
    except Exception as e:   # noqa: BLE001 - reported to the client, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            try:
                out = np.stack([r.render_rgba(sc) for sc in msg]) if msg else \
                    np.zeros((0, size, size, 4), np.float32)
                conn.send(("ok", out))
            except Exception as e:   # noqa: BLE001
                conn.send(("error", f"{type(e).__name__}: {e}"))
    except EOFError:
        pass
    finally:
        r.close()


class Renderer(_Closing):
    """Renders :class:`SceneParams` at ``size`` x ``size``.  Create it once: the 3D stage runs in a
    render server process (spawned, holding one EGL context and the uploaded meshes) and the 2D
    stages here; ``render`` returns uint8 (H, W, 3), ``render_many`` (N, H, W, 3), the 2D stages
    batched.  Close it (or use it as a context manager) to stop the server."""

    def __init__(self, size: int = 64):
        import multiprocessing as mp

        self._proc = self._conn = None
        if not SIZES[0] <= size <= SIZES[1]:
            raise ValueError(f"size: must be in {SIZES[0]}..{SIZES[1]}, got {size}")
        if os.environ.get("PYOPENGL_PLATFORM") != "egl":
            raise RuntimeError("PYOPENGL_PLATFORM must be 'egl' (set before OpenGL is imported)")
        self.size = int(size)
        self.frames = 0
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.size), daemon=True, name="provenance-render")
        self._proc.start()
        child.close()
        status, err = self._recv()
        if status != "ready":
            self.close()
            raise RuntimeError(f"the render server could not start: {err}")

    def _recv(self):
        if not self._conn.poll(120):
            raise RuntimeError("the render server did not answer within 120 s")
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the render server died (exit code {self._proc.exitcode})") from None

    def render_rgba_many(self, scenes: Sequence[SceneParams]) -> np.ndarray:
        """The 3D stage: float32 (N, H, W, 4), colour premultiplied by alpha (0 off the object)."""
        if self._conn is None:
            raise RuntimeError("the renderer is closed")
        scenes = list(scenes)
        self._conn.send(scenes)
        status, out = self._recv()
        if status != "ok":
            raise RuntimeError(f"rendering failed: {out}")
        self.frames += len(scenes)
        return out

    def render_rgba(self, scene: SceneParams) -> np.ndarray:
        """The 3D stage of one scene: float32 (H, W, 4)."""
        return self.render_rgba_many([scene])[0]

    def render_many(self, scenes: Sequence[SceneParams]) -> np.ndarray:
        """uint8 (N, H, W, 3): 3D, background, occlusion, corruption (batched), quantization."""
        scenes = list(scenes)
        if not scenes:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        rgba = self.render_rgba_many(scenes)
        img = composite_background(rgba, np.array([s.background for s in scenes], np.float32))
        for i, s in enumerate(scenes):
            if s.occlusion_ratio > 0:
                img[i] = occlude(img[i], s.occlusion_ratio, s.occlusion_position, s.occluder, s.noise_seed())
        if any(s.corruption for s in scenes):
            import torch

            x = torch.from_numpy(img).permute(0, 3, 1, 2)
            x = corrupt(x, [s.corruption for s in scenes], [s.severity for s in scenes],
                        [s.noise_seed() for s in scenes])
            img = x.permute(0, 2, 3, 1).numpy()
        return to_uint8(img)

    def render(self, scene: SceneParams) -> np.ndarray:
        """uint8 (H, W, 3)."""
        return self.render_many([scene])[0]

    def close(self):
        conn, self._conn = self._conn, None
        proc, self._proc = self._proc, None
        if conn is not None:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            conn.close()
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()



# ------------------------------------------------------------------ 2D stages

def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(img, np.float32) * 255.0), 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1], what a model is given."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def hsv_to_rgb(h: float, s: float, v: float) -> tuple:
    return colorsys.hsv_to_rgb(float(h), float(s), float(v))


def composite_background(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(..., H, W, 4) premultiplied renders over (..., 3) background colours -> (..., H, W, 3)."""
    bg = np.asarray(background, np.float32)[..., None, None, :]
    return rgba[..., :3] + (1.0 - rgba[..., 3:]) * bg


def occluder_box(size: int, ratio: float, position: tuple) -> tuple:
    """(y0, y1, x0, x1) of the square occluder covering ``ratio`` of a size x size image, its
    top-left corner at ``position`` of the free range (the patch never leaves the image)."""
    side = min(size, max(1, int(round(math.sqrt(ratio) * size))))
    x0 = int(round(float(position[0]) * (size - side)))
    y0 = int(round(float(position[1]) * (size - side)))
    return y0, y0 + side, x0, x0 + side


def occlude(img: np.ndarray, ratio: float, position: tuple, occluder: str = "gray", seed: int = 0) -> np.ndarray:
    """An (H, W, 3) float image with a square patch pasted over it (a copy)."""
    out = np.array(img, np.float32, copy=True)
    y0, y1, x0, x1 = occluder_box(out.shape[0], ratio, position)
    h, w = y1 - y0, x1 - x0
    if occluder == "noise":
        patch = np.random.default_rng([seed, 7]).random((h, w, 3), dtype=np.float32)
    elif occluder == "checker":
        cell = max(1, out.shape[0] // 16)
        yy, xx = np.mgrid[0:h, 0:w]
        patch = np.repeat((((yy // cell) + (xx // cell)) % 2).astype(np.float32)[..., None], 3, axis=2)
    else:
        patch = np.full((h, w, 3), {"gray": 0.5, "black": 0.0, "white": 1.0}[occluder], np.float32)
    out[y0:y1, x0:x1] = patch
    return out


# ------------------------------------------------------------------ corruptions

def blur_sigma(severity: int, size: int) -> float:
    return SEVERITIES["gaussian_blur"][severity - 1] * size / 64.0


def gaussian_kernel1d(sigma: float, size: int) -> np.ndarray:
    radius = min(int(math.ceil(3 * sigma)), size - 1)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-t * t / (2 * sigma * sigma))
    return k / k.sum()


def _noise(seed: int, shape) -> np.ndarray:
    """(H, W, 3) standard normal noise of an image's seed (shared by both corruption paths)."""
    return np.random.default_rng([int(seed), 11]).standard_normal(shape)


def corrupt(images: torch.Tensor, corruptions: Sequence[Optional[str]] | str,
            severities: Sequence[int] | int, seeds: Sequence[int] | int = 0) -> torch.Tensor:
    """The fast path: (N, 3, H, W) float images in [0, 1], each with its own corruption (None:
    untouched), severity 1..5 and noise seed (a single value applies to all); returns a new
    tensor in [0, 1].  Agrees with :func:`corrupt_reference` image by image."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    names = [corruptions] * n if isinstance(corruptions, str) or corruptions is None else list(corruptions)
    sev = [severities] * n if isinstance(severities, int) else list(severities)
    seeds = [seeds] * n if isinstance(seeds, int) else list(seeds)
    if not len(names) == len(sev) == len(seeds) == n:
        raise ValueError("corrupt: one corruption, severity and seed per image")
    x = images.float()
    out = x.clone()
    for name in sorted({c for c in names if c}):
        if name not in CORRUPTIONS:
            raise ValueError(f"corruption: {name!r} is not one of {CORRUPTIONS}")
        for s in sorted({sev[i] for i in range(n) if names[i] == name}):
            if not 1 <= s <= 5:
                raise ValueError(f"severity: must be 1..5, got {s}")
            idx = [i for i in range(n) if names[i] == name and sev[i] == s]
            xi = x[idx]
            c = SEVERITIES[name][s - 1]
            if name == "gaussian_noise":
                noise = torch.from_numpy(np.stack([_noise(seeds[i], (h, w, 3)) for i in idx]))
                y = xi + c * noise.permute(0, 3, 1, 2).to(xi.dtype)
            elif name == "gaussian_blur":
                k = torch.from_numpy(gaussian_kernel1d(blur_sigma(s, h), min(h, w))).to(xi.dtype)
                r = (len(k) - 1) // 2
                z = F.pad(xi.reshape(1, -1, h, w), (r, r, r, r), mode="reflect")
                ch = z.shape[1]
                z = F.conv2d(z, k.view(1, 1, 1, -1).expand(ch, 1, 1, -1), groups=ch)
                z = F.conv2d(z, k.view(1, 1, -1, 1).expand(ch, 1, -1, 1), groups=ch)
                y = z.reshape(len(idx), 3, h, w)
            elif name == "contrast":
                m = xi.mean(dim=(2, 3), keepdim=True)
                y = (xi - m) * c + m
            else:   # brightness: HSV value + c, clipped, hue and saturation kept
                v = xi.amax(dim=1, keepdim=True)
                lit = v > 0
                ratio = torch.where(lit, (v + c).clamp(max=1.0) / v.clamp(min=1e-12), torch.zeros_like(v))
                y = torch.where(lit, xi * ratio, torch.full_like(xi, min(c, 1.0)))
            out[idx] = y.clamp(0.0, 1.0)
    return out


def corrupt_reference(image: np.ndarray, corruption: Optional[str], severity: int, seed: int = 0) -> np.ndarray:
    """The plain path: one (H, W, 3) float image in [0, 1], numpy float64, written out from the
    ImageNet-C definitions (blur as a direct 2D convolution, brightness through colorsys)."""
    x = np.asarray(image, np.float64)
    if not corruption:
        return x.copy()
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption: {corruption!r} is not one of {CORRUPTIONS}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity: must be 1..5, got {severity}")
    c = SEVERITIES[corruption][severity - 1]
    h, w, _ = x.shape
    if corruption == "gaussian_noise":
        y = x + c * _noise(seed, x.shape)
    elif corruption == "gaussian_blur":
        k1 = gaussian_kernel1d(blur_sigma(severity, h), min(h, w))
        k2 = np.outer(k1, k1)
        r = (len(k1) - 1) // 2
        p = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
        y = np.zeros_like(x)
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                y += k2[dy, dx] * p[dy:dy + h, dx:dx + w]
    elif corruption == "contrast":
        m = x.mean(axis=(0, 1), keepdims=True)
        y = (x - m) * c + m
    else:
        y = np.empty_like(x)
        for i in range(h):
            for j in range(w):
                hh, ss, vv = colorsys.rgb_to_hsv(*x[i, j])
                y[i, j] = colorsys.hsv_to_rgb(hh, ss, min(vv + c, 1.0))
    return np.clip(y, 0.0, 1.0)


def render_scenes(scenes: Iterable[SceneParams], size: int = 64, renderer: Optional[Renderer] = None) -> np.ndarray:
    """uint8 (N, H, W, 3) of ``scenes`` with ``renderer`` (or a new one, closed afterwards)."""
    if renderer is not None:
        return renderer.render_many(list(scenes))
    with Renderer(size) as r:
        return r.render_many(list(scenes))
