"""Inference: a trained checkpoint + an image (+ its depth, given or estimated) -> triplanes ->
views along a camera trajectory -> colour and depth frames, video (mp4 + GIF), 16-bit depth PNGs
and the planes themselves (planes.safetensors).

Python API:
    model = g3dr.load("runs/x")                      # run folder or checkpoint file
    planes = model.reconstruct(image, depth)         # [1,3,H,W] in [0,1], [1,1,H,W] in G3DR units
    views = model.render(planes, (yaw, pitch), 256)  # {"rgb", "depth", "opacity"} [N,*,256,256]
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from PIL import Image
from tqdm import tqdm

import g3dr_kernels
from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays

from . import cameras as cams
from .checkpoint import PLANES_FORMAT
from .checkpoint import load as load_checkpoint
from .config import Config
from .data import IMAGE_EXTS, DataError, depth_path_for, fit_pair, load_pair, read_image
from .depth import load_depth_model, to_g3dr_depth
from .depthio import write_depth_png
from .devices import check_memory, pick_device
from .export import (MESH_FORMATS, VOXEL_FORMATS, check_out, colorize_depth, depth_mesh, extract_mesh, save_mesh,
                     save_voxels, voxel_occupancy, write_video)
from .files import UnsafeFileError, convert_hint, load_tensors, save_tensors
from .generate import generate_rgbd, load_ldm3d, save_rgbd
from .model import G3DR
from .webgl import HTML_FORMATS, export_html


def load(ckpt: Union[str, Path], device: Optional[str] = None, backend: Optional[str] = None) -> G3DR:
    """A g3dr run folder (its newest valid checkpoint), checkpoint file (.pt) or model file
    (.safetensors, see g3dr.checkpoint.save_model) -> G3DR in eval mode. Nothing is unpickled."""
    dev = pick_device(device)
    if backend not in (None, "auto"):
        info = g3dr_kernels.backends().get(backend)
        if info is None:
            raise ValueError(f"unknown backend {backend!r}; use auto, torch, cpu, triton or cuda")
        if not info["available"]:
            raise ValueError(f"--backend {backend} is not available here ({info['note']}); use auto")
    ck = load_checkpoint(ckpt, map_location="cpu")
    cfg = Config.from_dict(ck["config"])
    if backend:
        cfg.render.backend = backend
    model = G3DR(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt} does not match its own config: {str(e).splitlines()[0]}") from e
    return model.to(dev).eval()


def trajectory(spec: str, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """'front' (the official visualiser: yaw +-0.25, pitch +-0.1 rad), 'orbit' (a full turn), or a
    list of yaw:pitch offsets in radians from the canonical view, e.g. '0:0,0.3:0,-0.3:0.1'."""
    if spec == "front":
        return cams.front_circle(n)
    if spec == "orbit":
        return cams.orbit(n)
    try:
        pairs = [tuple(float(v) for v in item.split(":")) for item in spec.split(",") if item.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise ValueError(f"unknown trajectory {spec!r}: use front, orbit, or yaw:pitch offsets like '0:0,0.3:0.1'")
    yp = torch.tensor(pairs, dtype=torch.float32)
    return cams.CANONICAL_YAW + yp[:, 0], cams.CANONICAL_PITCH + yp[:, 1]


def load_input(image: Union[str, Path], size: int, depth: Union[str, Path, None] = None,
               depth_model=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """An image file and its depth (a G3DR depth file, a depth estimator from g3dr.depth, or the
    `name_depth.png` beside the image) -> image [1,3,s,s] in [0,1], depth [1,1,s,s]."""
    image = Path(image)
    if not image.is_file():
        raise DataError(f"input image not found: {image}")
    if depth is None and depth_model is not None:
        img = read_image(image)
        pil = Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())  # exact: img is 8-bit
        dep = to_g3dr_depth(depth_model.predict([pil])[0], kind=depth_model.kind)[None]
        model_name = getattr(depth_model, "model", depth_model).__class__.__name__
        img, dep = fit_pair(img, dep, size, image, f"estimated by {model_name}")
        return img[None], dep[None]
    depth = Path(depth) if depth is not None else depth_path_for(image)
    if depth is None:
        raise DataError(f"no depth for {image}: pass --depth FILE, or --depth-model DIR to estimate it, or put "
                        f"{image.stem}_depth.png beside it")
    img, dep = load_pair(image, depth, size)
    return img[None], dep[None]


def list_inputs(path: Union[str, Path]) -> List[Path]:
    """An image file, or every image under a folder (recursive; *_depth.png excluded)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input not found: {path}")
    items = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.stem.endswith("_depth"))
    if not items:
        raise DataError(f"no images under {path}")
    return items


def write_views(views: Dict[str, torch.Tensor], out: Path, fps: float = 12.0, frames: bool = True) -> Dict[str, Path]:
    """rgb/depth/opacity [N,*,R,R] -> out/{rgb,depth_color,depth16}/NNN.png, video.mp4, video.gif
    (colour | colourised depth side by side). Returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    rgb = (views["rgb"].clamp(0, 1).permute(0, 2, 3, 1).cpu() * 255).round().to(torch.uint8)
    depth = views["depth"][:, 0].cpu()
    cols = colour_depth_frames(depth, views["opacity"][:, 0].cpu() > 0.5)
    if frames:
        for sub in ("rgb", "depth_color", "depth16"):
            (out / sub).mkdir(exist_ok=True)
        for i in range(rgb.shape[0]):
            Image.fromarray(rgb[i].numpy()).save(out / "rgb" / f"{i:03d}.png")
            Image.fromarray(cols[i].numpy()).save(out / "depth_color" / f"{i:03d}.png")
            write_depth_png(out / "depth16" / f"{i:03d}.png", depth[i].clamp(4, 6))
    both = torch.cat([rgb, cols], 2)
    paths = {"mp4": write_video(both, out / "video.mp4", fps=fps), "gif": write_video(both, out / "video.gif", fps=fps)}
    return paths


def colour_depth_frames(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """depth [N,H,W], valid [N,H,W] bool (e.g. opacity > 0.5) -> uint8 [N,H,W,3]: turbo, near warm, one
    robust 2-98 percentile range over every frame (no flicker), empty pixels black."""
    rng = _robust_range(depth[valid] if valid.any() else depth.flatten())
    return torch.stack([torch.from_numpy(colorize_depth(d, mask=m, value_range=rng)) for d, m in zip(depth, valid)])


def _robust_range(values: torch.Tensor) -> Tuple[float, float]:
    v = values.float().flatten()
    if v.numel() > 200_000:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    lo, hi = torch.quantile(v, 0.02).item(), torch.quantile(v, 0.98).item()
    return (lo, hi if hi > lo else lo + 1e-3)


def output_dirs(items: List[Path], inputs, out: Path) -> List[Path]:
    """One output folder per input that no other input shares: out/<stem> for a single image; for a
    folder, out/<path relative to it without the extension>, keeping the extension (out/a/x.jpg) for
    inputs whose stems collide in one folder."""
    inputs = Path(inputs)
    if inputs.is_file():
        return [out / items[0].stem]
    rel = [p.relative_to(inputs) for p in items]
    plain = [r.parent / r.stem for r in rel]
    dup = {d for d in plain if plain.count(d) > 1}
    return [out / (r if d in dup else d) for r, d in zip(rel, plain)]


def replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished folder in for `dest` (two renames), so `dest` holds one render: never a mix with
    stale files of an earlier one, never half-written."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        if not dest.is_dir():
            raise NotADirectoryError(f"cannot write {dest}: it is a file, not a folder")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _clean_temps(folder: Path) -> None:
    """Remove `.name.tmp-PID` / `.name.old-PID` folders of render processes that no longer run."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = re.match(r"^\..+\.(tmp|old)-(\d+)$", p.name)
        if m and p.is_dir() and int(m.group(2)) != os.getpid():
            try:
                os.kill(int(m.group(2)), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except PermissionError:
                pass


def save_planes(path: Union[str, Path], planes: torch.Tensor, cfg: Config, image: str = "") -> Path:
    """planes [1,3,C,H,W] -> planes.safetensors with the model config (JSON) and the source image."""
    return save_tensors(path, {"planes": planes.detach().cpu().contiguous()},
                        {"format": PLANES_FORMAT, "config": json.dumps(cfg.to_dict(), sort_keys=True), "image": image})


def load_planes(path: Union[str, Path], device="cpu") -> torch.Tensor:
    """A planes.safetensors written by `g3dr render` -> planes [B,3,C,H,W]; pickled planes.pt files are
    refused (g3dr.files.UnsafeFileError names the conversion command)."""
    path = Path(path)
    if path.suffix == ".pt":  # the old pickled format: never opened
        if not path.is_file():
            raise FileNotFoundError(f"planes file not found: {path}")
        raise UnsafeFileError(convert_hint(path, path.with_suffix(".safetensors")))
    tensors, _ = load_tensors(path, device)
    if "planes" not in tensors:
        raise ValueError(f"{path} holds no 'planes' tensor (is it a planes file written by g3dr render?)")
    return tensors["planes"]


def render_inputs(ckpt, inputs, out, *, depth=None, depth_model_dir=None, trajectory_spec: str = "front",
                  n_frames: int = 48, resolution: Optional[int] = None, n_coarse: Optional[int] = None,
                  n_fine: Optional[int] = None,
                  sigma_scale: float = 1.0, chunk: int = 16384, device: Optional[str] = None,
                  backend: Optional[str] = None, fps: float = 12.0, progress: bool = True) -> List[Dict]:
    """`g3dr render`: every input image -> its own output folder under `out` (see output_dirs: frames,
    video.mp4, video.gif, planes.safetensors). Each folder is written under a temporary name and
    swapped in when complete: a failure (a full disk) leaves the previous render of that input intact."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    items = list_inputs(inputs)
    if depth is not None and len(items) != 1:
        raise ValueError("--depth names one depth file; give a single --input image with it")
    yaw, pitch = trajectory(trajectory_spec, n_frames)
    model = load(ckpt, device, backend)
    dev = next(model.parameters()).device
    res = resolution or model.cfg.model.image_size
    # kept per frame: rgb, depth, opacity (float32) + uint8 colour and depth frames; per chunk the rays
    check_memory(len(yaw) * res * res * (5 * 4 + 6) + res * res * 6 * 4, f"rendering {len(yaw)} frames at "
                 f"{res}x{res}", "use a smaller --resolution or fewer --frames", dev)
    est = None
    if depth_model_dir is not None:
        est = load_depth_model(depth_model_dir, device=dev)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for item, dest in zip(items, output_dirs(items, inputs, out)):
        img, dep = load_input(item, model.cfg.model.image_size, depth, est)
        planes = model.reconstruct(img.to(dev), dep.to(dev))
        frames = {"rgb": [], "depth": [], "opacity": []}
        for i in tqdm(range(len(yaw)), desc=f"render {item.name}", disable=not progress):
            v = model.render(planes, (yaw[i:i + 1], pitch[i:i + 1]), resolution, n_coarse=n_coarse, n_fine=n_fine,
                             sigma_scale=sigma_scale, chunk=chunk)
            for k in frames:
                frames[k].append(v[k])
        views = {k: torch.cat(v, 0) for k, v in frames.items()}
        dest.parent.mkdir(parents=True, exist_ok=True)
        _clean_temps(dest.parent)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            paths = write_views(views, tmp, fps)
            save_planes(tmp / "planes.safetensors", planes, model.cfg, str(item))
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        results.append({"input": str(item), "out": str(dest), "planes": str(dest / "planes.safetensors"),
                        **{k: str(dest / Path(v).name) for k, v in paths.items()}})
    return results


def planes_for(model: G3DR, source: Union[str, Path], depth=None, depth_model_dir=None) -> torch.Tensor:
    """planes [1,3,C,H,W] from a `planes.safetensors` written by `g3dr render`, or from an image (+ depth)."""
    source = Path(source)
    dev = next(model.parameters()).device
    if source.suffix in (".safetensors", ".pt"):
        planes = load_planes(source, dev)
        C = model.cfg.model.plane_channels
        if planes.dim() != 5 or planes.shape[1:3] != (3, C):
            raise ValueError(f"{source}: expected planes [B,3,{C},H,W] for this model, got {list(planes.shape)}")
        return planes[:1].to(dev).float()
    est = None
    if depth_model_dir is not None:
        est = load_depth_model(depth_model_dir, device=dev)
    img, dep = load_input(source, model.cfg.model.image_size, depth, est)
    return model.reconstruct(img.to(dev), dep.to(dev))


def export_inputs(ckpt, source, out, *, depth=None, depth_model_dir=None, resolution: int = 256, iso: float = 10.0,
                  crop: Optional[Tuple[float, ...]] = None, largest_component: bool = False,
                  decimate: Optional[int] = None, depth_mesh_out=None, voxels_out=None, voxel_resolution: int = 64,
                  n_coarse: Optional[int] = None, n_fine: Optional[int] = None,
                  device: Optional[str] = None, backend: Optional[str] = None) -> Dict[str, str]:
    """`g3dr export`: planes (or an image) -> a marching-cubes mesh with vertex colours (`out`: .glb/.obj/.ply)
    or the single-file WebGL viewer (`out`: .html; n_coarse / n_fine samples, default the model's config),
    optionally the canonical view as a depth mesh and a voxel occupancy grid (.npy/.npz/.binvox)."""
    html = out is not None and Path(out).suffix.lower() in HTML_FORMATS
    if out is None and depth_mesh_out is None and voxels_out is None:
        raise ValueError("nothing to export: give --out, --depth-mesh and/or --voxels")
    for path, formats, what in ((out, MESH_FORMATS + HTML_FORMATS, "mesh or viewer"), (depth_mesh_out, MESH_FORMATS, "depth mesh"),
                                (voxels_out, VOXEL_FORMATS, "voxel")):
        if path is not None:  # format, folder and permissions: before any expensive work
            check_out(path, formats, what)
    dev = pick_device(device)
    # the density grid (float32) and marching cubes' working arrays, and the voxel grid
    check_memory((resolution ** 3 * 16 if out is not None and not html else 0) + (voxel_resolution ** 3 * 8 if voxels_out else 0),
                 f"a {resolution}^3 density grid" if out is not None else f"a {voxel_resolution}^3 voxel grid",
                 "use a smaller --resolution / --voxel-res", dev)
    model = load(ckpt, device, backend)
    r = model.cfg.render
    planes = planes_for(model, source, depth, depth_model_dir)
    bbox = None
    if crop is not None:
        if len(crop) != 6:
            raise ValueError(f"--crop takes six numbers x0,y0,z0,x1,y1,z1, got {crop}")
        bbox = (tuple(crop[:3]), tuple(crop[3:]))
    kw = dict(levels=r.levels, box_warp=r.box_warp, plane_axes=r.plane_axes, density_bias=r.density_bias)
    written = {}
    if html:
        info = export_html(model, planes, out, n_coarse=n_coarse, n_fine=n_fine, title=Path(str(source)).stem)
        written["html"] = info["path"]
        written["html_size"] = (f"{info['bytes'] / 1e6:.2f} MB; planes stored as float16: {info['psnr_fp16']:.1f} dB "
                                f"PSNR vs float32 (max colour error {info['max_abs_rgb']:.2g})")
    elif out is not None:
        mesh = extract_mesh(planes, model.decoder, resolution, iso, bbox, largest_component, decimate, **kw)
        written["mesh"] = str(save_mesh(mesh, out))
    if depth_mesh_out is not None:
        cy, cp = cams.CANONICAL_YAW, cams.CANONICAL_PITCH
        res = model.cfg.model.image_size
        v = model.render(planes, (torch.tensor([cy]), torch.tensor([cp])), res)
        o, d = g3dr_rays(g3dr_cam2world(cy, cp, r.radius), r.fov, res)
        dm = depth_mesh(v["rgb"][0].cpu(), v["depth"][0, 0].cpu(), o[0], d[0], mask=v["opacity"][0, 0].cpu() > 0.5)
        written["depth_mesh"] = str(save_mesh(dm, depth_mesh_out))
    if voxels_out is not None:
        occ = voxel_occupancy(planes, model.decoder, voxel_resolution, iso=iso, bbox=bbox, **kw)
        written["voxels"] = str(save_voxels(voxels_out, occ, bbox, r.box_warp))
    return written


def generate_to_3d(ldm3d_dir, ckpt, out, *, prompt: Optional[str] = None, class_id: Optional[int] = None,
                   prompt_embeds=None, name: str = "generated", steps: int = 50, guidance: float = 5.0,
                   seed: Optional[int] = None, size: Optional[int] = 512, n_frames: int = 48,
                   mesh_out=None, device: Optional[str] = None, progress: bool = True, pipe=None,
                   **render_kw) -> Dict[str, str]:
    """`g3dr generate`: the paper's f_rgbd step (LDM3D: text or class -> RGB-D) then the same outputs as
    `g3dr render` (and `g3dr export` with mesh_out): out/name.png + name_depth.png, out/name/ (frames,
    video.mp4, video.gif, planes.safetensors), the mesh. `pipe` reuses a loaded pipeline."""
    dev = pick_device(device)
    pipe = pipe if pipe is not None else load_ldm3d(ldm3d_dir, device=dev)
    rgb, depth = generate_rgbd(pipe, prompt, prompt_embeds=prompt_embeds, class_id=class_id, height=size, width=size,
                               steps=steps, guidance=guidance, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    img_p, dep_p = save_rgbd(out, name, rgb, depth)
    written = {"image": str(img_p), "depth": str(dep_p)}
    res = render_inputs(ckpt, img_p, out, depth=dep_p, n_frames=n_frames, device=str(dev), progress=progress,
                        **render_kw)[0]
    written.update(views=res["out"], mp4=res["mp4"], gif=res["gif"])
    if mesh_out is not None:
        written.update(export_inputs(ckpt, res["planes"], mesh_out, device=str(dev)))
    return written
