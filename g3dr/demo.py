"""The main job for now: render the built-in scene on a turntable with the fused renderer, write a
PNG strip (colour row, depth row) and a GIF, and time every available backend against the
pure-PyTorch reference (forward, and forward+backward with a target depth)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import g3dr_kernels as K
from g3dr_kernels.cameras import camera_rays, fov_to_intrinsics, orbit_cameras
from g3dr_kernels.nn import TriplaneDecoder, TriplaneRenderer

from .scene import demo_decoder, demo_planes


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _depth_image(depth: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """depth [H,W] -> [H,W,3]: near bright, far dark, empty pixels black."""
    mask = opacity > 0.5
    if mask.any():
        lo, hi = depth[mask].min(), depth[mask].max()
        d = 1 - (depth - lo) / (hi - lo + 1e-6)
    else:
        d = torch.zeros_like(depth)
    d = torch.where(mask, 0.15 + 0.85 * d, torch.zeros_like(d))
    return torch.stack([d, d * 0.85 + 0.1 * mask, d * 0.6 + 0.25 * mask], -1)


def render_turntable(renderer: TriplaneRenderer, planes: torch.Tensor, views: int, res: int, fov: float,
                     chunk: int = 4096, progress: bool = True):
    cams = orbit_cameras(views, radius=2.7, elevation_deg=18.0)
    rays_o, rays_d = camera_rays(cams, fov_to_intrinsics(fov), res)
    rgbs, depths = [], []
    with torch.no_grad():
        for v in tqdm(range(views), desc="rendering views", disable=not progress):
            out_c, out_d, out_o = [], [], []
            for s in range(0, res * res, chunk):
                o = renderer(planes, rays_o[v:v + 1, s:s + chunk], rays_d[v:v + 1, s:s + chunk])
                out_c.append(o.rgb), out_d.append(o.depth), out_o.append(o.opacity)
            rgb = torch.cat(out_c, 1).reshape(res, res, 3)
            depth, opac = torch.cat(out_d, 1).reshape(res, res), torch.cat(out_o, 1).reshape(res, res)
            rgbs.append(rgb)
            depths.append(_depth_image(depth, opac))
    return rgbs, depths


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and Triton/compile caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def time_backends(device, res: int, fov: float, samples: int, channels: int = 32, plane_res: int = 64,
                  hidden: int = 64, repeats: int = 3) -> List[Dict]:
    """Fused render of 2 views at res x res with G3DR-like sizes (random planes [2,3,channels,plane_res^2],
    decoder hidden width `hidden`): forward, and forward+backward with a target depth."""
    g = torch.Generator().manual_seed(0)
    cams = orbit_cameras(2, radius=2.7, elevation_deg=18.0, device=device)
    rays_o, rays_d = camera_rays(cams, fov_to_intrinsics(fov, device=device), res)
    planes = (torch.randn(2, 3, channels, plane_res, plane_res, generator=g) * 0.5).to(device).requires_grad_()
    decoder = TriplaneDecoder(channels, hidden, 3).to(device)
    near, far = 1.7, 3.7
    depths = torch.linspace(near, far, samples, device=device).expand(2, res * res, samples).contiguous()
    target = torch.full((2, res * res), 2.5, device=device)
    rows = []
    avail = K.backends()
    for b in ("torch", "cpu", "triton", "cuda"):
        if not avail[b]["available"] or "render" not in avail[b]["ops"]:
            continue
        if (b == "cpu") != (device.type == "cpu") and b != "torch":
            continue

        def fwd(b=b):
            with torch.no_grad():
                return K.render_triplanes(planes, rays_o, rays_d, depths, *decoder.effective_params(), backend=b,
                                          return_weights=False)

        def fwd_bwd(b=b):
            out = K.render_triplanes(planes, rays_o, rays_d, depths, *decoder.effective_params(), target_depth=target,
                                     backend=b, return_weights=False)
            (out.rgb.square().mean() + out.depth.mean()).backward()

        rows.append(dict(backend=b, fwd=_time(fwd, repeats), fwd_bwd=_time(fwd_bwd, repeats)))
    return rows


def run_demo(out_dir: str = "outputs/demo", res: int = 64, views: int = 8, fov: float = 30.0, n_coarse: int = 32,
             n_fine: int = 32, backend: str = "auto", bench_res: int = 48, bench_samples: int = 48,
             device: str | None = None) -> Dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    planes = demo_planes().to(device)
    decoder = demo_decoder().to(device)
    renderer = TriplaneRenderer(decoder, n_coarse=n_coarse, n_fine=n_fine, white_background=True,
                                backend=backend).eval()
    t0 = time.perf_counter()
    rgbs, depths = render_turntable(renderer, planes, views, res, fov)
    t_render = time.perf_counter() - t0

    strip = torch.cat([torch.cat(rgbs, 1), torch.cat(depths, 1)], 0)
    Image.fromarray(_to_uint8(strip)).save(out / "turntable.png")
    frames = [Image.fromarray(_to_uint8(torch.cat([c, d], 1))) for c, d in zip(rgbs, depths)]
    frames[0].save(out / "turntable.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)

    print(f"\nrendered {views} views at {res}x{res} ({n_coarse}+{n_fine} samples/ray) in {t_render:.1f}s "
          f"on {device} -> {out / 'turntable.png'}, {out / 'turntable.gif'}")
    rows = time_backends(device, bench_res, fov, bench_samples)
    ref = next(r for r in rows if r["backend"] == "torch")
    print(f"\nfused render, 2 views x {bench_res}x{bench_res} rays x {bench_samples} samples, planes 32x64x64, "
          f"3 levels, hidden 64; best of 3 (device: {device}, {torch.get_num_threads()} threads)")
    print(f"{'backend':<8} {'forward ms':>11} {'speed-up':>9} {'fwd+bwd ms':>11} {'speed-up':>9}")
    for r in rows:
        print(f"{r['backend']:<8} {r['fwd'] * 1e3:>11.1f} {ref['fwd'] / r['fwd']:>8.2f}x "
              f"{r['fwd_bwd'] * 1e3:>11.1f} {ref['fwd_bwd'] / r['fwd_bwd']:>8.2f}x")
    missing = [b for b, v in K.backends().items() if not v["available"]]
    if missing:
        print(f"not available here: {', '.join(missing)} (see g3dr_kernels.backends())")
    return dict(png=str(out / "turntable.png"), gif=str(out / "turntable.gif"), timings=rows)
