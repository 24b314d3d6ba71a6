"""Analytic ray casting for the synthetic world (`controlnet.datasets.world`): NumPy only.

A pinhole camera casts one ray per sub-pixel; every primitive is intersected in closed form with all
rays at once, and a z-buffer keeps the nearest hit. The buffers are the ground truth: the hit
distance gives depth, the surface normal at the hit gives the normal map and the shading (Lambert +
ambient under one directional light), and the id of the nearest primitive's instance gives the
segmentation. Nothing is estimated.

World frame: y up, the ground is the plane y = 0, the backdrop the plane z = `Camera.wall_z`, the
camera looks along +z from negative z. Image right is +x (so the world is mirrored against a
right-handed one: only the camera frame below matters, and it is image right, image up, toward
the viewer). Primitives are dicts, ``{"kind": ..., "instance": id, ...}`` with the fields that
`intersect` reads for each kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_INF = np.float64(np.inf)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at `eye` looking at `target`, vertical field of view `fov` (degrees)."""

    eye: tuple[float, float, float] = (0.0, 2.3, -4.6)
    target: tuple[float, float, float] = (0.0, 0.7, 1.0)
    fov: float = 46.0
    wall_z: float = 4.0  # the backdrop plane

    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors: image right, image up, viewing direction."""
        forward = np.subtract(self.target, self.eye)
        forward = forward / np.linalg.norm(forward)
        right = np.cross((0.0, 1.0, 0.0), forward)
        right = right / np.linalg.norm(right)
        return right, np.cross(forward, right), forward

    def rays(self, size: int) -> np.ndarray:
        """(size * size, 3) unit directions through the pixel centres, row by row from the top left."""
        right, up, forward = self.frame()
        half = math.tan(math.radians(self.fov) / 2)
        s = ((np.arange(size) + 0.5) / size * 2 - 1) * half
        d = forward[None, None] + s[None, :, None] * right[None, None] - s[:, None, None] * up[None, None]
        d = d.reshape(-1, 3)
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) world points -> (N, 2) image coordinates normalised to [0, 1] (x right, y down)."""
        right, up, forward = self.frame()
        v = np.asarray(points, np.float64) - np.asarray(self.eye)
        depth = v @ forward
        half = math.tan(math.radians(self.fov) / 2)
        x = (v @ right) / depth / half
        y = (v @ up) / depth / half
        return np.stack([(x + 1) / 2, (1 - y) / 2], axis=1)

    def to_camera(self, normals: np.ndarray) -> np.ndarray:
        """World normals (..., 3) -> camera frame (image right, image up, toward the viewer)."""
        right, up, forward = self.frame()
        return np.stack([normals @ right, normals @ up, -(normals @ forward)], axis=-1)


@dataclass
class Buffers:
    """The z-buffer of one render, flat over rays: distance, world normal, instance id (-1: none)."""

    t: np.ndarray  # (N,) float64
    normal: np.ndarray  # (N, 3) float64
    instance: np.ndarray  # (N,) int32


def render(primitives: list[dict], camera: Camera, size: int) -> tuple[Buffers, np.ndarray]:
    """Cast the rays of a size x size image through `primitives`; the buffers and the (N, 3) rays."""
    d = camera.rays(size)
    o = np.asarray(camera.eye, np.float64)
    n = len(d)
    buffers = Buffers(np.full(n, _INF), np.zeros((n, 3)), np.full(n, -1, np.int32))
    for primitive in primitives:
        candidates = _candidates(primitive, o, d)
        if candidates is None:
            candidates = np.arange(n)
        elif not len(candidates):
            continue
        t, normal = intersect(primitive, o, d[candidates])
        closer = t < buffers.t[candidates]
        rows = candidates[closer]
        buffers.t[rows] = t[closer]
        buffers.normal[rows] = normal[closer]
        buffers.instance[rows] = primitive["instance"]
    return buffers, d


def intersect(p: dict, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit distance (inf: none) and the unit world normal there, per ray."""
    kind = p["kind"]
    if kind == "plane":
        return _plane(p, o, d)
    if kind == "sphere":
        return _sphere(np.asarray(p["center"]), p["radius"], o, d)
    if kind == "capsule":
        return _capsule(np.asarray(p["a"]), np.asarray(p["b"]), p["radius"], o, d)
    if kind == "box":
        return _box(p, o, d)
    if kind == "cylinder":
        return _cylinder(p, o, d)
    if kind == "cone":
        return _cone(p, o, d)
    raise ValueError(f"unknown primitive kind {kind!r}")


def bounding_sphere(p: dict) -> tuple[np.ndarray, float] | None:
    """A sphere holding primitive `p` (None for the unbounded planes)."""
    kind = p["kind"]
    if kind == "sphere":
        return np.asarray(p["center"], np.float64), p["radius"]
    if kind == "capsule":
        a, b = np.asarray(p["a"]), np.asarray(p["b"])
        return (a + b) / 2, np.linalg.norm(b - a) / 2 + p["radius"]
    if kind == "box":
        return np.asarray(p["center"], np.float64), p["half"] * math.sqrt(3)
    if kind in ("cylinder", "cone"):
        x, z = p["base"]
        return np.array([x, p["height"] / 2, z]), math.hypot(p["radius"], p["height"] / 2)
    return None


def _candidates(p: dict, o: np.ndarray, d: np.ndarray) -> np.ndarray | None:
    """Indices of the rays that pass through `p`'s bounding sphere (None: all rays)."""
    bound = bounding_sphere(p)
    if bound is None:
        return None
    center, radius = bound
    oc = center - o
    along = d @ oc
    miss = (oc @ oc) - along * along > (radius * 1.0001) ** 2
    return np.flatnonzero(~miss)


def _plane(p: dict, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The plane through `point` with normal `normal`, seen from the side the normal points to."""
    normal = np.asarray(p["normal"], np.float64)
    facing = d @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((np.asarray(p["point"]) - o) @ normal) / facing
    t = np.where((facing < 0) & (t > 0), t, _INF)
    return t, np.broadcast_to(normal, d.shape)


def _sphere(center: np.ndarray, radius: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    oc = o - center
    b = d @ oc
    h = b * b - (oc @ oc - radius * radius)
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(h)
    t = np.where((h >= 0) & (t > 0), t, _INF)
    normal = (o + np.where(np.isfinite(t), t, 0)[:, None] * d - center) / radius
    return t, normal


def _capsule(a: np.ndarray, b: np.ndarray, radius: float, o: np.ndarray, d: np.ndarray):
    """A segment a-b swept by a sphere (the limbs): the side in closed form, then the end caps."""
    ba, oa = b - a, o - a
    baba, baoa = ba @ ba, ba @ oa
    bard, rdoa = d @ ba, d @ oa
    qa = baba - bard * bard
    qb = baba * rdoa - baoa * bard
    qc = baba * (oa @ oa) - baoa * baoa - radius * radius * baba
    h = qb * qb - qa * qc
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-qb - np.sqrt(h)) / qa
    y = baoa + t_side * bard
    side = (h >= 0) & (y > 0) & (y < baba) & (t_side > 0)
    t = np.where(side, t_side, _INF)
    for end in (a, b):  # the caps: the nearer hit of the two end spheres where the side missed
        t_end, _ = _sphere(end, radius, o, d)
        t = np.where(~side & (t_end < t), t_end, t)
    hit = o + np.where(np.isfinite(t), t, 0)[:, None] * d
    along = np.clip((hit - a) @ ba / baba, 0, 1)
    normal = (hit - a - along[:, None] * ba) / radius
    return t, normal


def _box(p: dict, o: np.ndarray, d: np.ndarray):
    """A cube of half side `half` centred at `center`, turned by `yaw` radians about the vertical."""
    c, s = math.cos(p["yaw"]), math.sin(p["yaw"])
    axes = np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # rows: the cube's axes in the world
    lo = axes @ (o - np.asarray(p["center"]))
    ld = d @ axes.T
    half = p["half"]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - lo) / ld, (half - lo) / ld
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    near = np.where(np.isnan(near), -_INF, near)
    far = np.where(np.isnan(far), _INF, far)
    axis = np.argmax(near, axis=1)
    t_near, t_far = near.max(axis=1), far.min(axis=1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, _INF)
    rows = np.arange(len(d))
    local = np.zeros_like(ld)
    local[rows, axis] = -np.sign(ld[rows, axis])
    return t, local @ axes


def _cylinder(p: dict, o: np.ndarray, d: np.ndarray):
    """An upright cylinder standing on the ground at `base` (x, z): its side and top disc."""
    x, z = p["base"]
    r, height = p["radius"], p["height"]
    ox, oy, oz = o[0] - x, o[1], o[2] - z
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    qa = dx * dx + dz * dz
    qb = ox * dx + oz * dz
    h = qb * qb - qa * (ox * ox + oz * oz - r * r)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-qb - np.sqrt(h)) / qa
        t_top = (height - oy) / dy
    y = oy + t_side * dy
    side = (h >= 0) & (t_side > 0) & (y >= 0) & (y <= height)
    top = (t_top > 0) & ((ox + t_top * dx) ** 2 + (oz + t_top * dz) ** 2 <= r * r)
    t_side = np.where(side, t_side, _INF)
    t_top = np.where(top, t_top, _INF)
    t = np.minimum(t_side, t_top)
    on_side = t_side <= t_top
    ts = np.where(np.isfinite(t), t, 0)
    normal = np.stack([(ox + ts * dx) / r, np.zeros_like(ts), (oz + ts * dz) / r], axis=1)
    normal[~on_side] = (0.0, 1.0, 0.0)
    return t, normal


def _cone(p: dict, o: np.ndarray, d: np.ndarray):
    """An upright cone, base disc of `radius` on the ground at `base` (x, z), apex at `height`."""
    x, z = p["base"]
    r, height = p["radius"], p["height"]
    k2 = (r / height) ** 2
    ox, oy, oz = o[0] - x, o[1], o[2] - z
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    w = height - oy
    qa = dx * dx + dz * dz - k2 * dy * dy
    qb = ox * dx + oz * dz + k2 * w * dy
    qc = ox * ox + oz * oz - k2 * w * w
    h = qb * qb - qa * qc
    t = np.full(len(d), _INF)
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(h)
        for candidate in ((-qb - root) / qa, (-qb + root) / qa):
            y = oy + candidate * dy
            ok = (h >= 0) & (candidate > 0) & (y >= 0) & (y <= height)
            t = np.where(ok & (candidate < t), candidate, t)
    ts = np.where(np.isfinite(t), t, 0)
    hx, hy, hz = ox + ts * dx, oy + ts * dy, oz + ts * dz
    normal = np.stack([hx, k2 * (height - hy), hz], axis=1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    return t, normal
