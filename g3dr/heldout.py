"""Quality on held-out synthetic scenes: the numbers the README, the model card and the demo quote.

A held-out scene is one of the procedural family `seed` at an index no training set uses
(10^6 + k; training sets take indices 0..n-1). The model sees only the scene's canonical RGB-D
view; novel views around the canonical camera (by default the four corners yaw +-15 deg,
pitch +-5 deg) are rendered at the model's resolution and compared with the ray-cast truth:

  psnr_all        PSNR over every pixel of the novel view
  psnr_covis      PSNR over the pixels whose true surface point the input view also sees
  depth_med_obj   median |depth error| over the pixels that see an object (not the wall)
  depth_med_bg    the same over the pixels that see the wall
  flat_med_obj    the same for a flat plane at the median input depth (the baseline to beat)
  fog_obj         fraction of object pixels predicted more than FOG_MARGIN in front of the truth
  opacity_front   mean opacity accumulated in front of (truth - FOG_MARGIN) on object pixels
  canon_psnr, canon_depth_med   the input view itself, reconstructed

Higher is better for the PSNRs, lower for everything else (see DIRECTION).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from g3dr_kernels import render_triplanes, sampling
from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays

from .cameras import CANONICAL_PITCH, CANONICAL_YAW, canonical_camera_frame
from .metrics import FOG_MARGIN
from .synthetic import HELD_OUT_FIRST, Scene, cast, make_scene, render_view

NOVEL_OFFSETS = tuple((dy, dp) for dy in (-15.0, 15.0) for dp in (-5.0, 5.0))   # degrees around the canonical view
DIRECTION = {"psnr_all": "higher", "psnr_covis": "higher", "canon_psnr": "higher", "depth_med_obj": "lower",
             "depth_med_bg": "lower",
             "flat_med_obj": "lower", "fog_obj": "lower", "opacity_front": "lower", "canon_depth_med": "lower",
             "depth_ratio_to_flat": "lower"}


def held_out_indices(n: int) -> List[int]:
    return [HELD_OUT_FIRST + k for k in range(n)]


def covisible(scene: Scene, points: torch.Tensor, hit: torch.Tensor, radius: float, fov: float, res: int
              ) -> torch.Tensor:
    """points [R,3] (true surface points of a novel view), hit [R] bool -> [R] bool: the canonical
    camera sees the same point (inside its image and not occluded)."""
    p = points.double()
    eye, rel = canonical_camera_frame(p, radius)
    dist = rel.norm(dim=-1).clamp_min(1e-9)
    z = -rel[:, 2]                                   # along the view axis (the camera looks down its -z)
    lim = math.tan(math.radians(fov) / 2) * (1 + 1 / max(res - 1, 1))   # outermost pixel centre + half a pixel
    inside = (z > 0) & (rel[:, 0].abs() <= lim * z) & (rel[:, 1].abs() <= lim * z)
    d = (p - eye) / dist[:, None]
    seen = cast(scene, eye.expand_as(d), d)["depth"]
    return hit & inside & ((seen - dist).abs() < 2e-3)


def _psnr(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> float:
    """pred, true [3,H,W]; mask [H,W] -> PSNR (dB) over the masked pixels."""
    m = mask.bool()
    if not bool(m.any()):
        return float("nan")
    mse = (pred.double() - true.double()).pow(2)[:, m].mean()
    return float(10 * torch.log10(1 / mse.clamp_min(1e-12)))


def opacity_in_front(model, planes: torch.Tensor, rays_o: torch.Tensor, rays_d: torch.Tensor, stop: torch.Tensor,
                     n: int = 64) -> torch.Tensor:
    """Opacity accumulated along rays [1,R,3] from the box entry up to depth `stop` [1,R] (0 where the
    ray reaches `stop` before the box): how much the model occludes what lies behind."""
    r = model.cfg.render
    near, _, _ = sampling.ray_box_bounds(rays_o, rays_d, r.box_warp)
    end = torch.maximum(stop, near)
    s = torch.linspace(0, 1, n, device=rays_o.device, dtype=rays_o.dtype)
    depths = (near[..., None] + (end - near)[..., None] * s).contiguous()
    out = render_triplanes(planes, rays_o, rays_d, depths, *model.decoder.effective_params(), levels=r.levels,
                           box_warp=r.box_warp, plane_axes=r.plane_axes, density_bias=r.density_bias,
                           backend=r.backend)
    return out.opacity


@torch.no_grad()
def score_scene(model, scene: Scene, offsets: Sequence[Tuple[float, float]] = NOVEL_OFFSETS,
                n_coarse: Optional[int] = None, n_fine: Optional[int] = None, keep_views: bool = False) -> Dict:
    """One held-out scene: reconstruct from its canonical RGB-D, score the canonical view and the novel
    views at `offsets` (degrees). Returns the per-scene numbers (see the module docstring); with
    keep_views, also the rendered and true views for pictures ("views")."""
    cfg, dev = model.cfg, next(model.parameters()).device
    res, rc = cfg.model.image_size, cfg.render
    canon = render_view(scene, resolution=res, radius=rc.radius, fov=rc.fov)
    planes = model.reconstruct(canon["rgb"].float(), canon["depth"].float())
    med_in = float(canon["depth"].median())
    yaws = [CANONICAL_YAW] + [CANONICAL_YAW + math.radians(dy) for dy, _ in offsets]
    pitches = [CANONICAL_PITCH] + [CANONICAL_PITCH + math.radians(dp) for _, dp in offsets]
    pred = model.render(planes, (torch.tensor(yaws), torch.tensor(pitches)), res, n_coarse=n_coarse, n_fine=n_fine)
    out: Dict = {}
    c_rgb, c_dep = pred["rgb"][0].cpu(), pred["depth"][0, 0].cpu()
    out["canon_psnr"] = _psnr(c_rgb, canon["rgb"], torch.ones(res, res, dtype=torch.bool))
    out["canon_depth_med"] = float((c_dep.double() - canon["depth"][0]).abs().median())
    rows, views = [], []
    for i, (yaw, pitch) in enumerate(zip(yaws[1:], pitches[1:]), start=1):
        c2w = g3dr_cam2world(yaw, pitch, rc.radius, dtype=torch.float64)
        o, d = g3dr_rays(c2w, rc.fov, res)
        hit = cast(scene, o[0], d[0])
        t_rgb = hit["rgb"].T.reshape(3, res, res).float()
        t_dep = hit["depth"].reshape(res, res)
        obj = hit["objects"].reshape(res, res)
        cov = covisible(scene, hit["points"], hit["mask"], rc.radius, rc.fov, res).reshape(res, res)
        p_rgb, p_dep = pred["rgb"][i].cpu(), pred["depth"][i, 0].cpu().double()
        err = (p_dep - t_dep).abs()
        # the flat baseline: the plane facing the canonical camera at the median input depth
        eye = c2w[0, :3, 3]
        plane_x = -rc.radius + med_in
        flat = (plane_x - eye[0]) / d[0, :, 0].double()
        flat_err = (flat.reshape(res, res) - t_dep).abs()
        stop = torch.where(hit["mask"], hit["depth"] - FOG_MARGIN, torch.zeros_like(hit["depth"]))
        front = opacity_in_front(model, planes, o.float().to(dev), d.float().to(dev), stop.float()[None].to(dev))
        front = front[0].cpu().reshape(res, res)
        row = {"yaw_deg": round(math.degrees(yaw - CANONICAL_YAW), 3),
               "pitch_deg": round(math.degrees(pitch - CANONICAL_PITCH), 3),
               "psnr_all": _psnr(p_rgb, t_rgb, torch.ones(res, res, dtype=torch.bool)),
               "psnr_covis": _psnr(p_rgb, t_rgb, cov), "covis_fraction": float(cov.double().mean()),
               "object_fraction": float(obj.double().mean())}
        bg = hit["mask"].reshape(res, res) & ~obj
        if bool(bg.any()):
            row["depth_med_bg"] = float(err[bg].median())
        if bool(obj.any()):
            row.update(depth_med_obj=float(err[obj].median()), flat_med_obj=float(flat_err[obj].median()),
                       fog_obj=float((p_dep[obj] < t_dep[obj] - FOG_MARGIN).double().mean()),
                       opacity_front=float(front[obj].double().mean()))
        rows.append(row)
        if keep_views:
            views.append({"pred_rgb": p_rgb, "pred_depth": p_dep.float(), "true_rgb": t_rgb,
                          "true_depth": torch.where(hit["mask"].reshape(res, res), t_dep, torch.zeros(())).float(),
                          "objects": obj, "covis": cov})
    for k in ("psnr_all", "psnr_covis", "depth_med_obj", "depth_med_bg", "flat_med_obj", "fog_obj", "opacity_front"):
        vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    out["views"] = rows
    if keep_views:
        out["pictures"] = {"canon_rgb": c_rgb, "canon_depth": c_dep, "input_rgb": canon["rgb"].float(),
                           "input_depth": canon["depth"][0].float(), "novel": views}
        out["planes"] = planes
    return out


def score(model, n_scenes: int = 8, seed: Optional[int] = None, offsets: Sequence[Tuple[float, float]] = NOVEL_OFFSETS,
          n_coarse: Optional[int] = None, n_fine: Optional[int] = None, progress: bool = False) -> Dict:
    """Mean of score_scene over `n_scenes` held-out scenes of family `seed` (default: the model's
    training family, data.synthetic_seed). Returns {"mean": {...}, "scenes": [...], "setup": {...}}."""
    seed = model.cfg.data.synthetic_seed if seed is None else seed
    idx = held_out_indices(n_scenes)
    it = idx
    if progress:
        it = tqdm(idx, desc="held-out scenes", leave=False)
    scenes = [dict(index=i, **score_scene(model, make_scene(i, seed), offsets, n_coarse, n_fine)) for i in it]
    keys = [k for k in DIRECTION if k != "depth_ratio_to_flat"]
    mean = {}
    for k in keys:
        vals = [s[k] for s in scenes if k in s and math.isfinite(s[k])]
        mean[k] = sum(vals) / len(vals) if vals else float("nan")
    mean["depth_ratio_to_flat"] = mean["depth_med_obj"] / mean["flat_med_obj"] if mean["flat_med_obj"] else float("nan")
    setup = {"scenes": n_scenes, "family_seed": seed, "indices": f"{idx[0]}..{idx[-1]}", "offsets_deg": list(offsets),
             "resolution": model.cfg.model.image_size,
             "n_coarse": n_coarse or model.still_samples()[0],
             "n_fine": model.still_samples()[1] if n_fine is None else n_fine}
    return {"mean": mean, "scenes": scenes, "setup": setup}


def format_scores(mean: Dict[str, float]) -> str:
    """One line per number with its direction (higher/lower is better)."""
    lines = []
    for k, v in mean.items():
        unit = " dB" if k.endswith("psnr") or k.startswith("psnr") else ""
        lines.append(f"  {k:<22} {v:8.4f}{unit}   ({DIRECTION.get(k, '')} is better)")
    return "\n".join(lines)
