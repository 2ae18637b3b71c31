"""The main job: G3DR end to end on the built-in synthetic scenes.

1. train the `small` preset for a short fixed budget (about two minutes on 2 CPU cores; LPIPS-VGG
   with random weights when no VGG16 file is found, said loudly; CLIP is off in `small`);
2. reconstruct a held-out scene from its single canonical RGB-D view;
3. render a turntable (mp4 + GIF + PNG strip, colour and depth) and export meshes (.glb);
4. print novel-view PSNR and depth error against the scene's ground truth;
5. time every available kernel backend against the pure-PyTorch reference.
`--quick` does the same on the `tiny` preset in seconds (the tests run it).
Re-running continues the training run in `<out>/run` (resume) and redoes the rest.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

import g3dr_kernels as K
from g3dr_kernels.cameras import camera_rays, fov_to_intrinsics, g3dr_cam2world, g3dr_rays, orbit_cameras
from g3dr_kernels.nn import TriplaneDecoder

DEMO_STEPS = 60          # the small preset's budget: about two minutes on 2 CPU cores
NOVEL_YAWS = (-0.3, -0.15, 0.15, 0.3)   # novel-view offsets (radians) scored against ground truth


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


def print_timings(device: torch.device, rows: List[Dict], bench_res: int, samples: int) -> None:
    ref = next(r for r in rows if r["backend"] == "torch")
    print(f"\nfused render, 2 views x {bench_res}x{bench_res} rays x {samples} samples, planes 32x64x64, "
          f"3 levels, hidden 64; best of 3 (device: {device}, {torch.get_num_threads()} threads)")
    print(f"{'backend':<8} {'forward ms':>11} {'speed-up':>9} {'fwd+bwd ms':>11} {'speed-up':>9}")
    for r in rows:
        print(f"{r['backend']:<8} {r['fwd'] * 1e3:>11.1f} {ref['fwd'] / r['fwd']:>8.2f}x "
              f"{r['fwd_bwd'] * 1e3:>11.1f} {ref['fwd_bwd'] / r['fwd_bwd']:>8.2f}x")
    missing = [b for b, v in K.backends().items() if not v["available"]]
    if missing:
        print(f"not available here: {', '.join(missing)} (see g3dr_kernels.backends())")


def _strip(views: Dict[str, torch.Tensor], n: int) -> np.ndarray:
    """Colour row over colourised-depth row, n views evenly taken."""
    from .infer import colour_depth_frames
    idx = torch.linspace(0, views["rgb"].shape[0] - 1, n).round().long()
    rgb = views["rgb"][idx].clamp(0, 1).permute(0, 2, 3, 1).cpu()
    col = colour_depth_frames(views["depth"][idx, 0].cpu(), views["opacity"][idx, 0].cpu() > 0.5).float() / 255
    top, bottom = torch.cat(list(rgb), 1), torch.cat(list(col), 1)
    return (torch.cat([top, bottom], 0).numpy() * 255).round().astype(np.uint8)


def run_demo(out_dir: str = "outputs/demo", quick: bool = False, steps: int | None = None, device: str | None = None,
             backend: str = "auto", frames: int | None = None, progress: bool = True, timings: bool = True) -> Dict:
    from . import metrics
    from .cameras import CANONICAL_PITCH, CANONICAL_YAW, front_circle
    from .config import apply_overrides, preset
    from .export import depth_mesh, extract_mesh, save_mesh
    from .infer import load, write_views
    from .losses import _vgg16_file
    from .synthetic import held_out_scene, render_view
    from .train import train

    from .infer import pick_device
    dev = pick_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or (3 if quick else DEMO_STEPS)
    over = [f"train.steps={steps}", f"train.save_every={steps}", f"train.image_every={steps}",
            f"train.log_every={max(1, steps // 20)}", f"render.backend={backend}", f"train.device={dev}"]
    if not quick:
        over += ["schedule.lr=1e-3"]
    if _vgg16_file("") is None:
        print("\n*** no VGG16 weights found (loss.vgg_weights or $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth):\n"
              "*** the demo trains with a RANDOM VGG for LPIPS. Perceptual losses are not meaningful. ***\n")
        over.append("loss.allow_random_init=true")
    cfg = apply_overrides(preset("tiny" if quick else "small"), over)
    t0 = time.perf_counter()
    summary = train(cfg, out / "run", resume="auto", progress=progress)
    t_train = time.perf_counter() - t0
    print(f"trained {cfg.train.steps} steps of the {'tiny' if quick else 'small'} preset in {t_train:.0f} s "
          f"-> {out / 'run'}")

    model = load(out / "run", device=str(dev), backend=backend)
    res = cfg.model.image_size
    scene = held_out_scene(cfg.data.synthetic_seed)
    truth = render_view(scene, resolution=res, radius=cfg.render.radius, fov=cfg.render.fov)
    planes = model.reconstruct(truth["rgb"].float()[None], truth["depth"].float()[None])

    # turntable: the official visualiser's front circle
    n = frames or (8 if quick else 36)
    yaw, pitch = front_circle(n)
    ns = dict(n_coarse=2 * cfg.render.n_coarse, n_fine=2 * cfg.render.n_fine)
    views = model.render(planes, (yaw, pitch), res, **ns)
    paths = write_views(views, out / "turntable", fps=12, frames=False)
    Image.fromarray(_strip(views, min(8, n))).save(out / "turntable.png")

    # meshes: the canonical view as a depth mesh, and marching cubes of the density
    canon = model.render(planes, (torch.tensor([CANONICAL_YAW]), torch.tensor([CANONICAL_PITCH])), res, **ns)
    o, d = g3dr_rays(g3dr_cam2world(CANONICAL_YAW, CANONICAL_PITCH, cfg.render.radius), cfg.render.fov, res)
    save_mesh(depth_mesh(canon["rgb"][0].cpu(), canon["depth"][0, 0].cpu(), o[0], d[0], max_edge_jump=0.15),
              out / "depth_mesh.glb")
    mesh_note = str(out / "mesh.glb")
    try:
        r = cfg.render
        mesh = extract_mesh(planes, model.decoder, resolution=48 if quick else 128, levels=r.levels,
                            box_warp=r.box_warp, plane_axes=r.plane_axes, density_bias=r.density_bias)
        save_mesh(mesh, out / "mesh.glb")
    except ValueError as e:  # an under-trained density may not cross the iso level anywhere
        mesh_note = f"no marching-cubes mesh ({e})"

    # novel views against the scene's ground truth
    rows = []
    for dy in NOVEL_YAWS:
        t = render_view(scene, CANONICAL_YAW + dy, CANONICAL_PITCH, resolution=res, radius=cfg.render.radius,
                        fov=cfg.render.fov)
        v = model.render(planes, (torch.tensor([CANONICAL_YAW + dy]), torch.tensor([CANONICAL_PITCH])), res, **ns)
        mask = t["mask"]  # [1,H,W]: pixels whose true ray hits the scene
        true_depth = torch.where(mask, t["depth"][0], torch.zeros(())).float()
        rows.append(dict(yaw=dy, **metrics.view_metrics(v["rgb"].cpu(), t["rgb"].float()[None], v["depth"][:, 0].cpu(),
                                                        true_depth, mask=mask)))
    print(f"\nheld-out scene, reconstructed from its canonical RGB-D view ({res}x{res}); novel views vs ground truth:")
    print(f"{'yaw offset':>10} {'PSNR dB':>8} {'depth err mean':>15} {'median':>8}")
    for r_ in rows:
        print(f"{r_['yaw']:>+10.2f} {r_['psnr']:>8.2f} {r_['depth_abs_mean']:>15.4f} {r_['depth_abs_median']:>8.4f}")
    print(f"\nwrote {out / 'turntable.png'}, {paths['mp4']}, {paths['gif']}, {out / 'depth_mesh.glb'}, {mesh_note}")

    result = dict(run=str(out / "run"), png=str(out / "turntable.png"), mp4=str(paths["mp4"]), gif=str(paths["gif"]),
                  novel_views=rows, train_seconds=t_train, steps=summary["step"])
    if timings:
        bench_res, samples = (16, 16) if quick else (48, 48)
        rows_t = time_backends(dev, bench_res, 30.0, samples)
        print_timings(dev, rows_t, bench_res, samples)
        result["timings"] = rows_t
    return result
