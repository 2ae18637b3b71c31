"""Procedural 3D scenes with known geometry: the default dataset of the demo, the tests and the
fidelity benchmark.

A scene is a few textured primitives (spheres and axis-aligned boxes) in front of a backdrop wall,
all inside G3DR's box [-1, 1]^3, lit by a fixed directional light (Lambertian, so the radiance is
view-independent, as the renderer assumes). Every view is ray-cast analytically: for any camera
we know the true colour, the true depth (distance along the ray, G3DR's convention) and which
pixels hit anything. The canonical view (G3DR's camera at yaw = pitch = pi/2, radius 5, fov 18)
gives the training RGB-D pair; other views are ground truth for evaluation.

Scenes are a pure function of (seed, index). Vectorised over rays and primitives: a 128x128 view
takes a few milliseconds on a CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays

HELD_OUT_FIRST = 10 ** 6   # index of the first held-out scene of a family (training sets use 0..n-1)
BACKDROP_X = 0.8      # the wall x = 0.8, facing the canonical camera (which sits at x = -5)
WALL_HALF = 1.0       # the wall spans |y|, |z| <= 1 (the box)
_LIGHT = torch.tensor([-0.6, 0.7, -0.4]) / math.sqrt(0.6 ** 2 + 0.7 ** 2 + 0.4 ** 2)


@dataclass
class Scene:
    """Primitives of one scene (float64 for exact ray casting).
    spheres [Ns,4] (centre, radius), sphere_rgb [Ns,3]; boxes [Nb,6] (min xyz, max xyz), box_rgb [Nb,3];
    wall_rgb [2,3] (two checker colours); pattern [Ns+Nb] stripe frequency per object."""
    spheres: torch.Tensor
    sphere_rgb: torch.Tensor
    boxes: torch.Tensor
    box_rgb: torch.Tensor
    wall_rgb: torch.Tensor
    pattern: torch.Tensor


def make_scene(index: int, seed: int = 0) -> Scene:
    """Scene `index` of the family `seed`: 1-2 spheres and 1-2 boxes, placed in front of the wall
    without leaving the box [-0.85, 0.85]^3."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ns, nb = 1 + int(u(()) < 0.6), 1 + int(u(()) < 0.5)
    r = 0.18 + 0.22 * u(ns)
    c = torch.stack([-0.55 + 0.9 * u(ns), -0.5 + 1.0 * u(ns), -0.5 + 1.0 * u(ns)], -1)
    c = torch.maximum(torch.minimum(c, 0.85 - r[:, None]), -0.85 + r[:, None])
    c[:, 0] = torch.minimum(c[:, 0], BACKDROP_X - 0.05 - r)
    half = 0.1 + 0.2 * u(nb, 3)
    bc = torch.stack([-0.5 + 0.8 * u(nb), -0.5 + 1.0 * u(nb), -0.5 + 1.0 * u(nb)], -1)
    bc = torch.maximum(torch.minimum(bc, 0.85 - half), -0.85 + half)
    bc[:, 0] = torch.minimum(bc[:, 0], BACKDROP_X - 0.05 - half[:, 0])
    boxes = torch.cat([bc - half, bc + half], -1)
    hue = u(ns + nb + 2)
    cols = _hsv(hue, 0.45 + 0.45 * u(ns + nb + 2), 0.55 + 0.4 * u(ns + nb + 2))
    wall = cols[-2:] * 0.6 + 0.2
    return Scene(torch.cat([c, r[:, None]], -1), cols[:ns], boxes, cols[ns:ns + nb], wall, 2 + 4 * u(ns + nb))


def _hsv(h, s, v):
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _hit_spheres(o, d, spheres):
    """o, d [R,3]; spheres [K,4] -> t [R,K] (inf where missed), normals are computed later."""
    oc = o[:, None, :] - spheres[None, :, :3]
    b = (oc * d[:, None, :]).sum(-1)
    cc = (oc * oc).sum(-1) - spheres[None, :, 3] ** 2
    disc = b * b - cc
    t = -b - torch.sqrt(disc.clamp(min=0))
    return torch.where((disc > 0) & (t > 1e-6), t, torch.full_like(t, math.inf))


def _hit_boxes(o, d, boxes):
    """Slab test: o, d [R,3]; boxes [K,6] -> t [R,K] (entry distance, inf where missed)."""
    inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t0 = (boxes[None, :, :3] - o[:, None, :]) * inv[:, None, :]
    t1 = (boxes[None, :, 3:] - o[:, None, :]) * inv[:, None, :]
    tn = torch.minimum(t0, t1).amax(-1)
    tf = torch.maximum(t0, t1).amin(-1)
    return torch.where((tf >= tn) & (tn > 1e-6), tn, torch.full_like(tn, math.inf))


def _hit_wall(o, d):
    t = (BACKDROP_X - o[:, 0]) / torch.where(d[:, 0].abs() < 1e-12, torch.full_like(d[:, 0], 1e-12), d[:, 0])
    p = o + t[:, None] * d
    ok = (t > 1e-6) & (p[:, 1].abs() <= WALL_HALF) & (p[:, 2].abs() <= WALL_HALF)
    return torch.where(ok, t, torch.full_like(t, math.inf))


def cast(scene: Scene, rays_o: torch.Tensor, rays_d: torch.Tensor) -> Dict[str, torch.Tensor]:
    """rays_o, rays_d [R,3] -> rgb [R,3] in [0,1] (black where nothing is hit), depth [R] (distance
    along the ray; inf where nothing is hit), mask [R] bool, objects [R] bool (hits an object, not the
    wall), points [R,3], normals [R,3]."""
    dtype = rays_o.dtype
    o, d = rays_o.double(), rays_d.double()
    ts = torch.cat([_hit_spheres(o, d, scene.spheres), _hit_boxes(o, d, scene.boxes), _hit_wall(o, d)[:, None]], 1)
    t, k = ts.min(1)
    mask = torch.isfinite(t)
    tt = torch.where(mask, t, torch.zeros_like(t))
    p = o + tt[:, None] * d
    ns, nb = len(scene.spheres), len(scene.boxes)
    # normals
    n = torch.zeros_like(p)
    is_s = k < ns
    if ns:
        cs = scene.spheres[k.clamp(max=ns - 1), :3]
        n = torch.where(is_s[:, None], p - cs, n)
    is_b = (k >= ns) & (k < ns + nb)
    if nb:
        bx = scene.boxes[(k - ns).clamp(0, nb - 1)]
        ctr, half = (bx[:, :3] + bx[:, 3:]) / 2, (bx[:, 3:] - bx[:, :3]) / 2
        q = (p - ctr) / half
        face = q.abs().argmax(-1)
        nbox = torch.zeros_like(p).scatter_(1, face[:, None], torch.sign(q.gather(1, face[:, None])))
        n = torch.where(is_b[:, None], nbox, n)
    is_w = k == ns + nb
    n = torch.where(is_w[:, None], torch.tensor([-1.0, 0, 0], dtype=p.dtype).expand_as(p), n)
    n = torch.nn.functional.normalize(n, dim=-1)
    # albedo: object colour with 3D stripes (view-consistent texture); a checker on the wall
    obj_rgb = torch.cat([scene.sphere_rgb, scene.box_rgb], 0)
    freq = scene.pattern[k.clamp(max=ns + nb - 1)]
    stripes = 0.75 + 0.25 * torch.sign(torch.sin(freq * math.pi * (p[:, 0] + p[:, 1] * 0.7 + p[:, 2] * 0.4)))
    alb = obj_rgb[k.clamp(max=ns + nb - 1)] * stripes[:, None]
    checker = ((torch.floor(p[:, 1] * 4) + torch.floor(p[:, 2] * 4)) % 2).long()
    alb = torch.where(is_w[:, None], scene.wall_rgb[checker], alb)
    shade = 0.35 + 0.65 * (n * _LIGHT.to(p)).sum(-1).clamp(min=0)
    rgb = (alb * shade[:, None]).clamp(0, 1) * mask[:, None]
    depth = torch.where(mask, t, torch.full_like(t, math.inf))
    return dict(rgb=rgb.to(dtype), depth=depth.to(dtype), mask=mask, objects=mask & ~is_w, points=p.to(dtype),
                normals=n.to(dtype))


def render_view(scene: Scene, yaw: float = math.pi / 2, pitch: float = math.pi / 2, *, resolution: int = 128,
                radius: float = 5.0, fov: float = 18.0) -> Dict[str, torch.Tensor]:
    """One view with G3DR's camera -> rgb [3,H,W], depth [1,H,W] (inf where empty), mask [1,H,W],
    objects [1,H,W] (pixels that see an object rather than the wall)."""
    rays_o, rays_d = g3dr_rays(g3dr_cam2world(yaw, pitch, radius), fov, resolution)
    out = cast(scene, rays_o[0], rays_d[0])
    H = W = resolution
    return dict(rgb=out["rgb"].T.reshape(3, H, W), depth=out["depth"].reshape(1, H, W),
                mask=out["mask"].reshape(1, H, W), objects=out["objects"].reshape(1, H, W))


def canonical_rgbd(index: int, seed: int = 0, resolution: int = 128, radius: float = 5.0,
                   fov: float = 18.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training pair of scene `index`: image [3,H,W] in [0,1] and depth [1,H,W] (every canonical
    ray hits the wall or an object, so the depth is finite; it lies in [4, 6) at radius 5)."""
    v = render_view(make_scene(index, seed), resolution=resolution, radius=radius, fov=fov)
    return v["rgb"], v["depth"]


def density_field(scene: Scene, points: torch.Tensor, sharpness: float = 200.0) -> torch.Tensor:
    """Occupancy-like field for geometry metrics: points [N,3] -> [N] in (0,1), > 0.5 inside an
    object or behind the wall's front face (a slab 0.02 thick)."""
    p = points.double()
    sd = torch.full((p.shape[0],), math.inf, dtype=p.dtype)
    if len(scene.spheres):
        sd = torch.minimum(sd, ((p[:, None, :] - scene.spheres[None, :, :3]).norm(dim=-1) - scene.spheres[None, :, 3]
                                ).amin(1))
    if len(scene.boxes):
        ctr, half = (scene.boxes[:, :3] + scene.boxes[:, 3:]) / 2, (scene.boxes[:, 3:] - scene.boxes[:, :3]) / 2
        q = (p[:, None, :] - ctr[None]).abs() - half[None]
        box_sd = q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)
        sd = torch.minimum(sd, box_sd.amin(1))
    wq = torch.stack([(p[:, 0] - (BACKDROP_X + 0.01)).abs() - 0.01, p[:, 1].abs() - WALL_HALF,
                      p[:, 2].abs() - WALL_HALF], -1)
    sd = torch.minimum(sd, wq.clamp(min=0).norm(dim=-1) + wq.amax(-1).clamp(max=0))
    return torch.sigmoid(-sharpness * sd).to(points.dtype)


class SyntheticDataset(torch.utils.data.Dataset):
    """`n` procedural scenes as a training set: item i -> {"image" [3,H,W] in [0,1], "depth" [1,H,W],
    "objects" [1,H,W] bool (object pixels, for the training diagnostics), "index"}. Index i + n is
    scene i flipped horizontally (the official code's convention)."""

    def __init__(self, n: int = 512, resolution: int = 128, seed: int = 0, radius: float = 5.0, fov: float = 18.0):
        if n < 1:
            raise ValueError(f"SyntheticDataset needs n >= 1 scenes, got {n}")
        self.n, self.resolution, self.seed, self.radius, self.fov = n, resolution, seed, radius, fov
        self._cache: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        i, flip = k % self.n, k >= self.n
        if i not in self._cache:
            v = render_view(make_scene(i, self.seed), resolution=self.resolution, radius=self.radius, fov=self.fov)
            self._cache[i] = (v["rgb"].float(), v["depth"].float(), v["objects"])
        img, dep, obj = self._cache[i]
        if flip:
            img, dep, obj = img.flip(-1), dep.flip(-1), obj.flip(-1)
        return {"image": img, "depth": dep, "objects": obj, "index": torch.tensor(k)}

    def scene(self, i: int) -> Scene:
        return make_scene(i % self.n, self.seed)


def held_out_scene(seed: int = 0) -> Scene:
    """A scene outside every training set of family `seed` (index HELD_OUT_FIRST)."""
    return make_scene(HELD_OUT_FIRST, seed)
