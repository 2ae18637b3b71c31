"""The main job: G3DR end to end on built-in synthetic scenes it never saw in training.

1. load the shipped model (models/, trained by the `fast` preset; see models/README.md), or with `--train` train
   one first (the `fast` preset, `--steps` to shorten it; resumes in `<out>/run`);
2. reconstruct held-out scenes from their single canonical RGB-D view;
3. write heldout.png: per scene the input RGB and depth, the reconstruction of the input view, and
   novel views (colour and depth) beside the ground truth;
4. render a turntable of the first scene (mp4 + GIF + PNG strip, colour and depth), export its
   marching-cubes mesh and the input view as a depth mesh (.glb);
5. score the held-out scenes (g3dr.heldout: novel-view PSNR on co-visible and all pixels, object depth
   error against a flat-plane baseline, fog) into scores.json, and print them;
6. time every available kernel backend against the pure-PyTorch reference.
`--quick` trains the `tiny` preset for a few steps instead (seconds; the tests run it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

import g3dr_kernels as K
from g3dr_kernels.cameras import camera_rays, fov_to_intrinsics, g3dr_cam2world, g3dr_rays, orbit_cameras
from g3dr_kernels.nn import TriplaneDecoder

from .cameras import CANONICAL_PITCH, CANONICAL_YAW, front_circle
from .config import apply_overrides, preset
from .devices import pick_device
from .export import colorize_depth, depth_mesh, extract_mesh, save_mesh
from .files import write_png
from .heldout import format_scores, held_out_indices, score, score_scene
from .infer import colour_depth_frames, load, write_views
from .synthetic import make_scene, render_view
from .train import train

MODEL = Path(__file__).resolve().parent.parent / "models" / "g3dr-fast-synthetic.safetensors"
PICTURE_OFFSETS = ((-15.0, 0.0), (15.0, 0.0), (0.0, 5.0))   # novel views (yaw, pitch degrees) in heldout.png


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
    idx = torch.linspace(0, views["rgb"].shape[0] - 1, n).round().long()
    rgb = views["rgb"][idx].clamp(0, 1).permute(0, 2, 3, 1).cpu()
    col = colour_depth_frames(views["depth"][idx, 0].cpu(), views["opacity"][idx, 0].cpu() > 0.5).float() / 255
    top, bottom = torch.cat(list(rgb), 1), torch.cat(list(col), 1)
    return (torch.cat([top, bottom], 0).numpy() * 255).round().astype(np.uint8)


def _u8(x: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] -> uint8 [H,W,3]."""
    return (x.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def heldout_picture(model, scenes, path: Path, scale: int = 2) -> Path:
    """One row per scene: input RGB | input depth | reconstruction (input view) RGB | depth | then per
    novel view of PICTURE_OFFSETS: predicted RGB | true RGB | predicted depth | true depth. Depths share
    one colour range per row (turbo, near = warm)."""
    rows = []
    for scene in scenes:
        s = score_scene(model, scene, PICTURE_OFFSETS, keep_views=True)
        pic = s["pictures"]
        rng = (float(pic["input_depth"].min()), float(pic["input_depth"].max()))

        def dep(d):
            return colorize_depth(d.cpu(), value_range=rng)
        cells = [_u8(pic["input_rgb"]), dep(pic["input_depth"]), _u8(pic["canon_rgb"]), dep(pic["canon_depth"])]
        for v in pic["novel"]:
            cells += [_u8(v["pred_rgb"]), _u8(v["true_rgb"]), dep(v["pred_depth"]), dep(v["true_depth"])]
        gap = np.full((cells[0].shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([c for cell in cells for c in (cell, gap)][:-1], 1))
    grid = np.concatenate([r for row in rows for r in (row, np.full((2, row.shape[1], 3), 255, np.uint8))][:-1], 0)
    img = Image.fromarray(grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(path, img)


def run_demo(out_dir: str = "outputs/demo", quick: bool = False, steps: int | None = None, device: str | None = None,
             backend: str = "auto", frames: int | None = None, progress: bool = True, timings: bool = True,
             train_model: bool = False, model_path: str | None = None, scenes: int = 8) -> Dict:
    """See the module docstring. Returns the paths written and the held-out scores."""
    dev = pick_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: Dict = {}
    if quick or train_model:
        name = "tiny" if quick else "fast"
        cfg = preset(name)
        cfg = apply_overrides(cfg, [f"render.backend={backend}", f"train.device={dev}",
                                    f"train.steps={steps or (3 if quick else cfg.train.steps)}"])
        t0 = time.perf_counter()
        summary = train(cfg, out / "run", resume="auto", progress=progress)
        source = out / "run"
        result.update(train_seconds=time.perf_counter() - t0, steps=summary["step"], run=str(source))
        print(f"trained the {name} preset in {result['train_seconds']:.0f} s -> {source}")
    else:
        source = Path(model_path) if model_path else MODEL
        if not source.exists():
            raise FileNotFoundError(f"model not found: {source} (the repository ships it under models/; "
                                    f"`g3dr demo --train` trains one instead)")
        print(f"model: {source}")
    model = load(source, device=str(dev), backend=backend)
    cfg = model.cfg
    res = cfg.model.image_size
    n_scenes = 2 if quick else scenes
    seed = cfg.data.synthetic_seed
    held = [make_scene(i, seed) for i in held_out_indices(n_scenes)]

    # pictures: input, reconstruction, novel views beside the truth, for four held-out scenes
    heldout_picture(model, held[:4], out / "heldout.png")

    # turntable of the first scene: the official visualiser's front circle
    truth = render_view(held[0], resolution=res, radius=cfg.render.radius, fov=cfg.render.fov)
    planes = model.reconstruct(truth["rgb"].float(), truth["depth"].float())
    n = frames or (8 if quick else 36)
    yaw, pitch = front_circle(n)
    views = model.render(planes, (yaw, pitch), res)
    paths = write_views(views, out / "turntable", fps=12, frames=False)
    Image.fromarray(_strip(views, min(8, n))).save(out / "turntable.png")

    # meshes: the input view as a depth mesh, and marching cubes of the density
    canon = model.render(planes, (torch.tensor([CANONICAL_YAW]), torch.tensor([CANONICAL_PITCH])), res)
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

    # scores on the held-out scenes
    t0 = time.perf_counter()
    scores = score(model, n_scenes=n_scenes, progress=progress)
    scores.update(model=str(source), seconds=round(time.perf_counter() - t0, 1))
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    print(f"\n{n_scenes} held-out scenes (never trained on), each reconstructed from its canonical RGB-D view "
          f"({res}x{res}); novel views at yaw +-15, pitch +-5 degrees against ground truth:")
    print(format_scores(scores["mean"]))
    print(f"\nwrote {out / 'heldout.png'}, {out / 'scores.json'}, {out / 'turntable.png'}, {paths['mp4']}, "
          f"{paths['gif']}, {out / 'depth_mesh.glb'}, {mesh_note}")
    result.update(png=str(out / "turntable.png"), heldout_png=str(out / "heldout.png"), mp4=str(paths["mp4"]),
                  gif=str(paths["gif"]), scores=scores["mean"], model=str(source))
    if timings:
        bench_res, samples = (16, 16) if quick else (48, 48)
        rows_t = time_backends(dev, bench_res, 30.0, samples)
        print_timings(dev, rows_t, bench_res, samples)
        result["timings"] = rows_t
    return result
