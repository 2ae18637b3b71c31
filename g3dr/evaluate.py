"""`g3dr eval`: score a trained G3DR model.

`evaluate(model_or_ckpt, data=...)` reconstructs scenes from their canonical RGB-D view and renders
them from a grid of yaw/pitch offsets (radians, around G3DR's canonical camera yaw = pitch = pi/2):

- synthetic data (held-out procedural scenes, indices `first_scene`.. far from every training set's):
  novel-view PSNR / SSIM / LPIPS and absolute depth error (mean, median; pixels whose true ray hits
  the scene) against the analytic ground truth; NFS and depth accuracy on the canonical and the novel
  views; geometry: volume IoU of occupancy grids (model density > iso vs `synthetic.density_field` >
  0.5) and Chamfer-L1 / F-score between the marching-cubes mesh and points on the true surface;
  FID/KID/IS of the renders vs the true views when an Inception file (or any extractor) is given.
- a folder (official layout, `name.jpg` + `name_depth.png`): what needs no ground truth: NFS,
  depth accuracy of the canonical render vs the input depth, FID/KID/IS vs the input images.
- sigma scaling (the paper's Table S1): every metric again with the density multiplied by each s
  (`G3DR.render(sigma_scale=s)`, exact; the occupancy and mesh use density x s > iso); FID/KID/IS at s = 1 only.

NFS clamps depth maps to the canonical ray bounds [radius - box_warp/2, radius + box_warp/2]
(= [4, 6], G3DR's depth range, for radius 5 and box_warp 2) and uses 64 bins (3DGP).
Depth accuracy (G3DR supplement): MSE between mean/std-normalised rendered and reference depths.

Anything with `reconstruct(image, depth, scene=None)`, `render(state, yaw, pitch, resolution,
sigma_scale)`, `occupancy(state, points, sigma_scale)` and `surface_points(state, n, sigma_scale)`
can be evaluated (`EvalTarget`); `GroundTruth` is the synthetic scenes themselves through the same
code path, so `evaluate(GroundTruth(cfg))` must score PSNR inf, depth error 0, IoU 1, Chamfer 0.

The depth-kernel ablation (`g3dr eval --ablation`, benchmarks/fidelity.py) trains models and scores
them with `evaluate`: g3dr/ablation.py.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays

from . import metrics as M
from .cameras import CANONICAL_PITCH, CANONICAL_YAW
from .config import Config
from .data import FolderDataset
from .devices import pick_device
from .export import extract_mesh, grid_points, mesh_points, query_field
from .files import write_json
from .infer import load
from .losses import load_lpips, vgg16_file
from .model import G3DR
from .synthetic import BACKDROP_X, HELD_OUT_FIRST, canonical_rgbd, cast, density_field, make_scene, render_view

ALL_METRICS = ("psnr", "ssim", "lpips", "depth", "nfs", "depth_accuracy", "geometry", "sigma_scaling", "fid")
BEHIND_WALL_MARGIN = 0.05   # IoU box stops this far in front of the backdrop wall (see _iou_bbox)


# ---------------------------------------------------------------------------------------------
# What is evaluated: a G3DR model, or the ground truth itself
# ---------------------------------------------------------------------------------------------


class EvalTarget:
    """Interface of what `evaluate` scores. `state` is whatever reconstruct returns (planes)."""
    cfg: Config

    def reconstruct(self, image: torch.Tensor, depth: torch.Tensor, scene=None):
        """image [1,3,H,W] in [0,1], depth [1,1,H,W] (G3DR units); scene: the synthetic Scene or None."""
        raise NotImplementedError

    def render(self, state, yaw: torch.Tensor, pitch: torch.Tensor, resolution: int, sigma_scale: float = 1.0
               ) -> Dict[str, torch.Tensor]:
        """yaw, pitch [N] radians -> rgb [N,3,R,R] in [0,1], depth [N,1,R,R], opacity [N,1,R,R] (CPU)."""
        raise NotImplementedError

    def occupancy(self, state, points: torch.Tensor, sigma_scale: float = 1.0) -> torch.Tensor:
        """points [M,3] (world units) -> bool [M]."""
        raise NotImplementedError

    def surface_points(self, state, n: int, sigma_scale: float = 1.0) -> torch.Tensor:
        """n points [n,3] on the surface; ValueError when there is none."""
        raise NotImplementedError


class ModelTarget(EvalTarget):
    """A G3DR model: planes from `reconstruct`, renders from `render` (n_coarse/n_fine samples), the
    occupancy density x s > iso (density per world unit; iso 10 = opacity 1 - 1/e over 0.1), and the
    surface from marching cubes at that iso on a `mesh_resolution`^3 grid."""

    def __init__(self, model, n_coarse: Optional[int] = None, n_fine: Optional[int] = None, iso: float = 10.0,
                 mesh_resolution: int = 64):
        self.model, self.cfg = model, model.cfg
        self.n_coarse, self.n_fine, self.iso, self.mesh_resolution = n_coarse, n_fine, iso, mesh_resolution

    @property
    def device(self):
        return next(self.model.parameters()).device

    def reconstruct(self, image, depth, scene=None):
        return self.model.reconstruct(image.to(self.device), depth.to(self.device))

    def render(self, state, yaw, pitch, resolution, sigma_scale=1.0):
        v = self.model.render(state, (yaw.to(self.device), pitch.to(self.device)), resolution, n_coarse=self.n_coarse,
                              n_fine=self.n_fine, sigma_scale=sigma_scale)
        return {k: t.float().cpu() for k, t in v.items()}

    def _field_kw(self):
        r = self.cfg.render
        return dict(levels=r.levels, box_warp=r.box_warp, plane_axes=r.plane_axes, density_bias=r.density_bias)

    def occupancy(self, state, points, sigma_scale=1.0):
        dens, _ = query_field(state, self.model.decoder, points.to(self.device).float(), **self._field_kw())
        return (dens * sigma_scale > self.iso).cpu()

    def surface_points(self, state, n, sigma_scale=1.0):
        mesh = extract_mesh(state, self.model.decoder, resolution=self.mesh_resolution, iso=self.iso / sigma_scale,
                            **self._field_kw())
        return mesh_points(mesh, n)


class GroundTruth(EvalTarget):
    """The synthetic scenes themselves (ray-cast), as an EvalTarget: the known-answer check of the
    evaluation code. Surfaces are infinitely dense, so sigma_scale changes nothing. Rays that miss
    get the far bound as depth (what a renderer with an empty background gives after clamping)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def reconstruct(self, image, depth, scene=None):
        if scene is None:
            raise ValueError("GroundTruth evaluates synthetic scenes only (data='synthetic')")
        return scene

    def render(self, state, yaw, pitch, resolution, sigma_scale=1.0):
        t = _truth(state, yaw, pitch, resolution, self.cfg)
        return {"rgb": t["rgb"], "depth": t["depth"], "opacity": t["mask"][:, None].float()}

    def occupancy(self, state, points, sigma_scale=1.0):
        return density_field(state, points.cpu()) > 0.5

    def surface_points(self, state, n, sigma_scale=1.0):
        return true_surface_points(state, self.cfg, n, max(16, math.ceil(math.sqrt(2 * n / 15))))


def true_surface_points(scene, cfg: Config, n: int, resolution: int = 64, seed: int = 0) -> torch.Tensor:
    """n points [n,3] (float64) on the true surface: ray-cast hits from 15 views (yaw offsets -0.6..0.6
    in 5 steps x pitch offsets -0.3, 0, 0.3 around the canonical camera, `resolution`^2 rays each),
    a fixed random subset. Only surfaces seen from the front hemisphere count (the wall's back is not)."""
    yaw = CANONICAL_YAW + torch.linspace(-0.6, 0.6, 5).repeat_interleave(3)
    pitch = CANONICAL_PITCH + torch.tensor([-0.3, 0.0, 0.3]).repeat(5)
    o, d = g3dr_rays(g3dr_cam2world(yaw, pitch, cfg.render.radius), cfg.render.fov, resolution)
    hit = cast(scene, o.reshape(-1, 3).double(), d.reshape(-1, 3).double())
    pts = hit["points"][hit["mask"]]
    g = torch.Generator().manual_seed(seed)
    return pts[torch.randperm(pts.shape[0], generator=g)[:n]] if pts.shape[0] > n else pts


def _as_target(obj, device, n_coarse, n_fine, iso, mesh_resolution) -> Tuple[EvalTarget, str]:
    if isinstance(obj, EvalTarget):
        return obj, type(obj).__name__
    if isinstance(obj, G3DR):
        model = obj.to(device) if device is not None else obj
        return ModelTarget(model.eval(), n_coarse, n_fine, iso, mesh_resolution), "G3DR module"
    if isinstance(obj, (str, Path)):
        return ModelTarget(load(obj, device=device), n_coarse, n_fine, iso, mesh_resolution), str(obj)
    raise TypeError(f"evaluate: expected a checkpoint path, a run folder, a G3DR model or an EvalTarget, "
                    f"got {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _views(yaw_offsets, pitch_offsets) -> List[Tuple[float, float]]:
    views = [(0.0, 0.0)] + [(float(y), float(p)) for p in pitch_offsets for y in yaw_offsets]
    out = []
    for v in views:  # canonical first, each view once
        if v not in out:
            out.append(v)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


_LPIPS_CACHE: Dict[Tuple[str, bool], torch.nn.Module] = {}


def _lpips_net(target: EvalTarget, notes: Dict[str, str]):
    """LPIPS-VGG per the target's loss config (loaded once per process), or None with a note."""
    lo = target.cfg.loss
    key = (lo.vgg_weights, lo.allow_random_init)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = _LPIPS_CACHE[key] if key in _LPIPS_CACHE else load_lpips(lo)
        _LPIPS_CACHE[key] = net
    except (FileNotFoundError, ImportError) as e:
        notes["lpips"] = f"skipped: {e}"
        return None
    try:
        random_vgg = vgg16_file(lo.vgg_weights) is None
    except FileNotFoundError:
        random_vgg = True
    if random_vgg:
        notes["lpips"] = "computed with a RANDOM VGG16 (loss.allow_random_init=true, no weights file): not meaningful"
    return net


def _extractor(inception, notes: Dict[str, str]):
    """(features for FID/KID, logits for IS) or None, with a note saying why not."""
    if inception is None:
        notes["fid"] = (f"skipped: no Inception weights; pass inception=/path/to/{M.INCEPTION_WEIGHTS_FILE} "
                        f"(from {M.INCEPTION_WEIGHTS_URL})")
        return None
    if isinstance(inception, torch.nn.Module):
        notes["fid"] = f"computed with a caller-supplied extractor ({type(inception).__name__}), not Inception"
        return inception, inception
    try:
        return M.inception_extractor(inception), M.inception_extractor(inception, "logits_unbiased")
    except (FileNotFoundError, ImportError) as e:
        notes["fid"] = f"skipped: {e}"
        return None


def _score_views(pred, true, want, lpips_net, bounds, has_truth: bool) -> List[Dict[str, float]]:
    """One scene, one sigma scale, N views at once: pred {rgb [N,3,R,R], depth [N,1,R,R]}; true the
    same plus mask [N,R,R] (or only depth on folder data, or None) -> per-view metric dicts."""
    d = pred["depth"][:, 0]
    n = d.shape[0]
    cols: Dict[str, List[float]] = {}
    if "nfs" in want:
        cols["nfs"] = M.nfs(d, *bounds, reduction="none").tolist()
    if true is not None and "depth_accuracy" in want:
        cols["depth_accuracy"] = [M.depth_accuracy(d[i], true["depth"][i, 0]) for i in range(n)]
    if true is not None and has_truth:
        if "psnr" in want:
            cols["psnr"] = M.psnr(pred["rgb"], true["rgb"]).per_image.tolist()
        if "ssim" in want and min(pred["rgb"].shape[-2:]) >= 11:
            cols["ssim"] = M.ssim(pred["rgb"], true["rgb"]).per_image.tolist()
        if "lpips" in want and lpips_net is not None:
            cols["lpips"] = M.lpips_distance(pred["rgb"], true["rgb"], lpips_net).per_image.tolist()
        if "depth" in want:
            errs = [M.depth_errors(d[i], true["depth"][i, 0], true["mask"][i]) for i in range(n)]
            cols["depth_abs_mean"] = [e["abs_mean"] for e in errs]
            cols["depth_abs_median"] = [e["abs_median"] for e in errs]
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def _iou_bbox(cfg: Config):
    """IoU box: the triplane box, stopped BEHIND_WALL_MARGIN in front of the backdrop wall. The wall is
    a 0.02-thick slab (thinner than a 64^3 cell) with nothing knowable behind it, so the IoU scores
    the objects and the empty space around them."""
    h = cfg.render.box_warp / 2
    return ((-h, -h, -h), (BACKDROP_X - BEHIND_WALL_MARGIN, h, h))


@torch.no_grad()
def evaluate(ckpt_or_model, data: str = "synthetic", metrics: Sequence[str] = ALL_METRICS, n_scenes: int = 8,
             yaw_offsets: Sequence[float] = (-0.4, -0.2, 0.0, 0.2, 0.4), pitch_offsets: Sequence[float] = (0.0, 0.15),
             sigma_scales: Sequence[float] = (1, 5, 10, 50), out: Union[str, Path, None] = None,
             device: Optional[str] = None, progress: bool = True, *, resolution: Optional[int] = None,
             first_scene: int = HELD_OUT_FIRST, n_coarse: Optional[int] = None, n_fine: Optional[int] = None,
             iso: float = 10.0, geometry_resolution: int = 64, n_points: int = 10000, fscore_threshold: float = 0.05,
             inception=None) -> Dict:
    """Score a model (checkpoint file, run folder, `G3DR`, or any `EvalTarget`) on `data`
    ("synthetic": held-out procedural scenes `first_scene`..+n_scenes of the model's scene family; or
    a folder of `name.jpg` + `name_depth.png`, its first n_scenes pairs).

    Views: the canonical camera plus every (yaw offset, pitch offset) pair (radians), rendered at
    `resolution` (default: the model's image size) with the config's sample counts (or n_coarse /
    n_fine). "Novel" numbers average every view but the canonical one. Geometry: IoU on a
    `geometry_resolution`^3 grid of cell centres (box in front of the wall), Chamfer-L1 and F-score
    (threshold in world units; the box is 2 wide) between `n_points` points on the mesh (marching
    cubes at density `iso`) and on the true surface (`true_surface_points`). FID/KID/IS need
    `inception` (a local weights-file path, or any feature-extractor module).

    Returns (and, with `out`, writes atomically to out/eval.json):
      {"metrics": {name: value} at s = 1, "per_view": [{yaw, pitch, metric...}] at s = 1,
       "sigma_scaling": {str(s): {name: value}}, "notes": {metric: why skipped/caveat}, "meta": {...}}
    Metric names: psnr, ssim, lpips, depth_abs_mean, depth_abs_median (novel views, truth-masked
    pixels); psnr_canonical, depth_abs_mean_canonical; nfs_canonical, nfs_novel;
    depth_accuracy_canonical, depth_accuracy_novel; iou, chamfer, fscore, precision, recall; fid,
    kid, kid_std, inception_score. Lower is better for LPIPS, depth errors, depth accuracy, Chamfer, FID, KID.
    """
    eval_args = dict(metrics=metrics, n_scenes=n_scenes, yaw_offsets=yaw_offsets, pitch_offsets=pitch_offsets,
                     sigma_scales=sigma_scales, resolution=resolution, first_scene=first_scene, n_coarse=n_coarse,
                     n_fine=n_fine, iso=iso, geometry_resolution=geometry_resolution, n_points=n_points,
                     fscore_threshold=fscore_threshold, inception=inception)
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(ALL_METRICS)}")
    if not (isinstance(n_scenes, int) and n_scenes >= 1):
        raise ValueError(f"n_scenes must be an integer >= 1, got {n_scenes!r}")
    scales = [float(s) for s in sigma_scales] if "sigma_scaling" in metrics else []
    if any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"sigma_scales must be finite numbers > 0, got {list(sigma_scales)}")
    scales = [1.0] + [s for s in scales if s != 1.0]
    dev = pick_device(device)
    target, source = _as_target(ckpt_or_model, dev if not isinstance(ckpt_or_model, EvalTarget) else None,
                                n_coarse, n_fine, iso, geometry_resolution)
    cfg = target.cfg
    res = resolution or cfg.model.image_size
    r = cfg.render
    bounds = (r.radius - r.box_warp / 2, r.radius + r.box_warp / 2)
    views = _views(yaw_offsets, pitch_offsets)
    yaw = torch.tensor([CANONICAL_YAW + v[0] for v in views])
    pitch = torch.tensor([CANONICAL_PITCH + v[1] for v in views])
    synthetic = data == "synthetic"
    want = set(metrics)
    notes: Dict[str, str] = {}
    if not synthetic:
        for m in ("psnr", "ssim", "lpips", "depth", "geometry"):
            if m in want:
                notes[m] = "skipped: needs ground truth (synthetic data only)"
        want -= {"psnr", "ssim", "lpips", "depth", "geometry"}
    if "ssim" in want and res < 11:
        notes["ssim"] = f"skipped: {res}x{res} views are smaller than the 11x11 SSIM window"
    lpips_net = _lpips_net(target, notes) if "lpips" in want else None
    if lpips_net is not None and isinstance(target, ModelTarget):
        lpips_net = lpips_net.to(target.device)
    ext = _extractor(inception, notes) if "fid" in want else None

    items = _items(data, cfg, n_scenes, first_scene)
    t0 = time.perf_counter()
    per_scene: Dict[float, List[Dict]] = {s: [] for s in scales}
    per_view_rows: Dict[float, List[List[Dict]]] = {s: [] for s in scales}
    real, fake = [], []
    bar = None
    if progress:
        bar = tqdm(total=len(items) * len(scales), desc="eval", dynamic_ncols=True)
    for image, depth, scene, _ in items:
        state = target.reconstruct(image[None], depth[None], scene=scene)
        truth = _truth(scene, yaw, pitch, res, cfg) if synthetic else None
        geo_truth = _geometry_truth(scene, cfg, geometry_resolution, n_points) if "geometry" in want else None
        for s in scales:
            pred = target.render(state, yaw, pitch, res, sigma_scale=s)
            row: Dict[str, Optional[float]] = {}
            if synthetic:
                views_out = _score_views(pred, truth, want, lpips_net, bounds, True)
                per_view_rows[s].append(views_out)
                canon, novel = views_out[0], views_out[1:]
                for k in ("psnr", "ssim", "lpips", "depth_abs_mean", "depth_abs_median"):
                    if k in canon:
                        row[k] = _mean([v.get(k) for v in novel]) if novel else None
                        row[k + "_canonical"] = canon[k]
            else:
                ref = {"depth": torch.nn.functional.interpolate(depth[None].float(), size=(res, res), mode="bilinear",
                                                                antialias=True) if depth.shape[-1] != res
                       else depth[None].float()}
                canon = _score_views(_take(pred, 0), ref, want, None, bounds, False)[0]
                novel = _score_views(_take(pred, slice(1, None)), None, want, None, bounds, False)
                if "depth_accuracy" in canon:
                    row["depth_accuracy_canonical"] = canon["depth_accuracy"]
            if "nfs" in want:
                row["nfs_canonical"] = canon["nfs"]
                row["nfs_novel"] = _mean([v["nfs"] for v in novel])
            if synthetic and "depth_accuracy" in want:
                row["depth_accuracy_canonical"] = canon["depth_accuracy"]
                row["depth_accuracy_novel"] = _mean([v["depth_accuracy"] for v in novel])
            if "geometry" in want:
                row.update(_geometry(target, state, geo_truth, s, n_points, fscore_threshold, notes))
            if s == 1.0 and ext is not None:
                fake.append(pred["rgb"])  # every view; real: the true views, or the input images on a folder
                real.append(truth["rgb"] if synthetic else image[None])
            per_scene[s].append(row)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    agg = {s: {k: _mean([row.get(k) for row in per_scene[s]]) for k in per_scene[s][0]} for s in scales}
    if ext is not None:
        agg[1.0].update(_distribution_metrics(torch.cat(real), torch.cat(fake), ext, notes))
    per_view = []
    if synthetic:
        for i, (dy, dp) in enumerate(views):
            rec = {"yaw": dy, "pitch": dp}
            for k in per_view_rows[1.0][0][i]:
                rec[k] = _mean([sc[i].get(k) for sc in per_view_rows[1.0]])
            per_view.append(rec)
    result = {
        "metrics": agg[1.0],
        "per_view": per_view,
        "sigma_scaling": {sigma_key(s): agg[s] for s in scales} if "sigma_scaling" in metrics else {},
        "notes": notes,
        "meta": dict(source=source, data=data, n_scenes=len(items), scenes=[it[3] for it in items],
                     views=[list(v) for v in views], resolution=res, sigma_scales=scales,
                     n_coarse=n_coarse or r.n_coarse, n_fine=n_fine or r.n_fine, nfs_bounds=list(bounds),
                     iso=iso, geometry_resolution=geometry_resolution, n_points=n_points,
                     fscore_threshold=fscore_threshold, iou_bbox=[list(b) for b in _iou_bbox(cfg)],
                     requested=list(metrics), device=str(dev), seconds=time.perf_counter() - t0, **machine_info(),
                     eval_args=json.loads(json.dumps(eval_args, default=str))),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result, allow_nan=True)  # PSNR of a perfect render is inf
    return result


def sigma_key(s: float) -> str:
    """The key of sigma scale s in a result's "sigma_scaling" (1.0 -> "1", 0.5 -> "0.5")."""
    return f"{s:g}"


def _take(d, i):
    """Views i (an int -> one view, or a slice) of a render dict."""
    i = slice(i, i + 1) if isinstance(i, int) else i
    return None if d is None else {k: v[i] for k, v in d.items()}


def _items(data, cfg: Config, n: int, first: int):
    """[(image [3,H,W], depth [1,H,W], scene or None, id)] at the model's input size."""
    if data == "synthetic":
        seed = cfg.data.synthetic_seed
        out = []
        for i in range(first, first + n):
            img, dep = canonical_rgbd(i, seed, cfg.model.image_size, cfg.render.radius, cfg.render.fov)
            out.append((img.float(), dep.float(), make_scene(i, seed), f"synthetic:{seed}:{i}"))
        return out
    if not isinstance(data, (str, Path)):
        raise TypeError(f"data must be 'synthetic' or a folder path, got {type(data).__name__}")
    ds = FolderDataset(data, cfg.model.image_size)
    return [(ds[k]["image"], ds[k]["depth"], None, str(ds.items[k][0])) for k in range(min(n, len(ds)))]


def _truth(scene, yaw, pitch, res, cfg) -> Dict[str, torch.Tensor]:
    """Ground truth of the views yaw, pitch [N]: rgb [N,3,R,R], depth [N,1,R,R] (the far bound where
    the ray misses everything), mask [N,R,R] (the ray hits the scene)."""
    r = cfg.render
    far = r.radius + r.box_warp / 2
    vs = [render_view(scene, float(y), float(p), resolution=res, radius=r.radius, fov=r.fov)
          for y, p in zip(yaw.tolist(), pitch.tolist())]
    depth = torch.stack([torch.where(v["mask"], v["depth"], torch.full_like(v["depth"], far)) for v in vs])
    return {"rgb": torch.stack([v["rgb"] for v in vs]).float(), "depth": depth.float(),
            "mask": torch.stack([v["mask"] for v in vs])[:, 0]}


def _geometry_truth(scene, cfg, grid_res, n_points):
    """(grid points [G^3,3] of the IoU box, true occupancy bool [G^3], true surface points [n,3])."""
    pts = grid_points(grid_res, _iou_bbox(cfg), cell_centers=True).reshape(-1, 3).float()
    # enough rays that the 15 views hold about 2 n hits
    ray_res = max(16, math.ceil(math.sqrt(2 * n_points / 15)))
    return pts, density_field(scene, pts) > 0.5, true_surface_points(scene, cfg, n_points, ray_res)


def _geometry(target, state, geo_truth, s, n_points, thr, notes) -> Dict[str, Optional[float]]:
    pts, occ_true, truth = geo_truth
    occ_pred = target.occupancy(state, pts, sigma_scale=s)
    out: Dict[str, Optional[float]] = {"iou": M.iou(occ_pred.cpu(), occ_true)}
    try:
        surf = target.surface_points(state, n_points, sigma_scale=s)
    except ValueError as e:  # no surface at this iso: say so, score nothing
        notes.setdefault("geometry", f"some scenes/scales have no surface at the iso level ({e}); Chamfer/F-score "
                                     f"average the others")
        return {**out, "chamfer": None, "fscore": None, "precision": None, "recall": None}
    f = M.fscore(surf.double(), truth.double(), thr)
    return {**out, "chamfer": M.chamfer(surf.double(), truth.double()), **f}


def _distribution_metrics(real, fake, ext, notes) -> Dict[str, float]:
    """FID, KID (mean, std) and IS of fake [N,3,H,W] vs real [M,3,H,W]; skipped (note) below 2 images."""
    feats, logits = ext
    if min(real.shape[0], fake.shape[0]) < 2:
        notes["fid"] = f"skipped: FID/KID need >= 2 images per set, got {real.shape[0]} real, {fake.shape[0]} rendered"
        return {}
    out = {"fid": M.fid(real, fake, feats)}
    n = min(real.shape[0], fake.shape[0])
    out["kid"], out["kid_std"] = M.kid(real, fake, feats, subsets=10, subset_size=n)
    with warnings.catch_warnings():  # one split: torchmetrics warns that the std is undefined
        warnings.simplefilter("ignore", UserWarning)
        out["inception_score"], _ = M.inception_score(fake, logits, splits=1)
    if n < 100:
        notes.setdefault("fid", "")
        notes["fid"] = (notes["fid"] + "; " if notes["fid"] else "") + \
            f"only {n} images per set: FID/KID/IS are biased at this size (EG3D uses 50k)"
    return out


def machine_info() -> Dict[str, str]:
    """Machine, commit and date for result files."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    commit = commit or os.environ.get("G3DR_COMMIT", "")  # a copy outside git says where it came from
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": f"{cpu}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else ""), "torch": torch.__version__,
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

# (metric, label, higher is better)
_LABELS = [("psnr", "PSNR (novel) dB", True), ("ssim", "SSIM (novel)", True), ("lpips", "LPIPS (novel)", False),
           ("depth_abs_mean", "depth |err| mean", False), ("depth_abs_median", "depth |err| median", False),
           ("psnr_canonical", "PSNR (canonical) dB", True), ("nfs_canonical", "NFS (canonical)", True),
           ("nfs_novel", "NFS (novel)", True), ("depth_accuracy_canonical", "depth acc. (canonical)", False),
           ("depth_accuracy_novel", "depth acc. (novel)", False), ("iou", "IoU", True), ("chamfer", "Chamfer-L1", False),
           ("fscore", "F-score", True), ("fid", "FID", False), ("kid", "KID", False), ("inception_score", "IS", True)]


def format_number(v) -> str:
    """A metric for a table: 4 significant digits, "-" for a missing one."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.4g}"


def format_table(result: Dict) -> str:
    """A readable text table of an `evaluate` result: the metrics at s = 1, per view, per sigma scale, notes."""
    m = result["metrics"]
    lines = [f"{'metric':<26}{'value':>12}  better"]
    lines += [f"{label:<26}{format_number(m[k]):>12}  {'higher' if up else 'lower'}"
              for k, label, up in _LABELS if k in m]
    pv = result.get("per_view") or []
    if pv:
        keys = [k for k in ("psnr", "ssim", "lpips", "depth_abs_mean", "nfs", "depth_accuracy") if k in pv[0]]
        lines += ["", f"{'yaw':>6}{'pitch':>7}" + "".join(f"{k:>16}" for k in keys)]
        lines += [f"{v['yaw']:>+6.2f}{v['pitch']:>+7.2f}" + "".join(f"{format_number(v[k]):>16}" for k in keys)
                  for v in pv]
    ss = result.get("sigma_scaling") or {}
    if len(ss) > 1:
        keys = [k for k in ("psnr", "depth_abs_mean", "nfs_canonical", "depth_accuracy_canonical", "iou", "chamfer")
                if k in m]
        lines += ["", f"{'sigma x':>8}" + "".join(f"{k:>26}" for k in keys)]
        lines += [f"{s:>8}" + "".join(f"{format_number(row.get(k)):>26}" for k in keys) for s, row in ss.items()]
    for k, v in (result.get("notes") or {}).items():
        lines.append(f"note [{k}]: {v}")
    return "\n".join(lines)
