"""From triplanes to files people can open: meshes, depth meshes, voxels, videos, coloured depth.

- `density_grid`: density softplus(sigma + density_bias) on a regular grid, chunked through the fused
  `g3dr_kernels.sample_triplanes` and the decoder (no gradient); `query_field` for any points.
- `extract_mesh` (marching cubes, scikit-image) -> trimesh.Trimesh with per-vertex colour queried at the
  vertices; `save_mesh` -> .glb / .obj / .ply; `mesh_points` samples its surface (for Chamfer / F-score).
- `depth_mesh`: one view's depth map as a triangulated height field with colours, cut at depth jumps
  (G3DR scenes are opaque front surfaces, so this is often the cleanest export).
- `voxel_occupancy`, `save_voxels` / `load_voxels`: .npy, .npz, .binvox.
- `colorize_depth` (turbo / viridis), `write_video` (.mp4 via imageio-ffmpeg, .gif via PIL).
Every file write is atomic: a temp file in the target folder, then a rename; nothing half-written is
left behind on failure. 16-bit depth PNGs: `g3dr.depthio`.
Units: world (scene) units throughout; G3DR's box is [-box_warp/2, box_warp/2]^3 = [-1, 1]^3.
Optional packages: `pip install "g3dr[export]"` (scikit-image, trimesh, imageio, imageio-ffmpeg).

Example (planes [1,3,C,H,W] of one scene and its TriplaneDecoder, levels as trained):
    mesh = extract_mesh(planes, decoder, resolution=256, iso=10.0, levels=3, largest_component=True)
    save_mesh(mesh, "scene.glb")
    save_voxels("scene.binvox", voxel_occupancy(planes, decoder, 64, levels=3))
    write_video(frames_uint8_THW3, "turntable.mp4", fps=24)
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial import chebyshev
from PIL import Image
from torch import nn

from g3dr_kernels import reference, sample_triplanes

from .files import atomic_write, write_bytes

Tensor = torch.Tensor
PathLike = Union[str, Path]
BBox = Optional[Tuple[Sequence[float], Sequence[float]]]

MESH_FORMATS = (".glb", ".obj", ".ply")
VOXEL_FORMATS = (".npy", ".npz", ".binvox")
VIDEO_FORMATS = (".mp4", ".gif")


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if hasattr(t, "shape") else type(t).__name__


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def check_out(path: PathLike, formats: Sequence[str], what: str) -> Path:
    """A path we can write `what` to: a known format, an existing writable folder, not a folder itself."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in formats:
        raise ValueError(f"unknown {what} format {ext or '(no extension)'!r} for {path}; "
                         f"use one of {', '.join(formats)}")
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"cannot write {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {parent} is not a folder")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: the folder {parent} is not writable")
    return path


_atomic_write = atomic_write  # the former name here; the writer lives in g3dr/files.py


# ---------------------------------------------------------------------------------------------
# Querying the field
# ---------------------------------------------------------------------------------------------


def _params(decoder) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if isinstance(decoder, nn.Module):
        if not hasattr(decoder, "effective_params"):
            raise TypeError(f"decoder must be a TriplaneDecoder or (w1, b1, w2, b2), got {type(decoder).__name__}")
        decoder = decoder.effective_params()
    if not isinstance(decoder, (tuple, list)) or len(decoder) != 4 or not all(isinstance(p, Tensor) for p in decoder):
        raise TypeError("decoder must be a TriplaneDecoder or a tuple of 4 tensors (w1, b1, w2, b2)")
    return tuple(p.detach() for p in decoder)


def _planes(planes):
    """[3,C,H,W] or [1,3,C,H,W] (or a finest-first list of [1,3,C,h,w]) -> batch-1 planes."""
    if isinstance(planes, Tensor):
        if planes.dim() == 4:
            planes = planes.unsqueeze(0)
        if planes.dim() != 5 or planes.shape[0] != 1 or planes.shape[1] != 3:
            raise ValueError(f"planes must be one scene, [3,C,H,W] or [1,3,C,H,W], got [{_shape(planes)}]")
        return planes.detach()
    if isinstance(planes, (list, tuple)) and planes and all(isinstance(p, Tensor) for p in planes):
        if any(p.dim() != 5 or p.shape[0] != 1 for p in planes):
            raise ValueError(f"a plane pyramid must be [1,3,C,h,w] tensors, got {[_shape(p) for p in planes]}")
        return [p.detach() for p in planes]
    raise TypeError(f"planes must be a tensor or a list of tensors, got {type(planes).__name__}")


def _bbox(bbox: BBox, box_warp: float, device) -> Tuple[Tensor, Tensor]:
    if bbox is None:
        lo, hi = [-box_warp / 2] * 3, [box_warp / 2] * 3
    else:
        try:
            lo, hi = bbox
            lo, hi = [float(v) for v in lo], [float(v) for v in hi]
        except (TypeError, ValueError) as e:
            raise ValueError(f"bbox must be ((xmin, ymin, zmin), (xmax, ymax, zmax)), got {bbox!r}") from e
        if len(lo) != 3 or len(hi) != 3 or not all(b > a for a, b in zip(lo, hi)):
            raise ValueError(f"bbox must be ((xmin, ymin, zmin), (xmax, ymax, zmax)) with min < max, got {bbox!r}")
    return (torch.tensor(lo, dtype=torch.float64, device=device), torch.tensor(hi, dtype=torch.float64, device=device))


@torch.no_grad()
def query_field(planes, decoder, points: Tensor, *, levels: int = 3, box_warp: float = 2.0,
                plane_axes: str = "eg3d", density_bias: float = -1.0, chunk: int = 2 ** 18,
                backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """density [N] = softplus(sigma + density_bias) (per world unit) and rgb [N,D] (in [0,1]) at
    points [N,3] (world units), in chunks of `chunk` points. planes: one scene, [3,C,H,W] or
    [1,3,C,H,W] (or a finest-first pyramid); decoder: a TriplaneDecoder or (w1, b1, w2, b2)."""
    pl = _planes(planes)
    w1, b1, w2, b2 = _params(decoder)
    ref = pl if isinstance(pl, Tensor) else pl[0]
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N,3], got [{_shape(points)}]")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    pts = points.to(ref.device, torch.float64 if ref.dtype == torch.float64 else torch.float32)
    dens, cols = [], []
    for i in range(0, pts.shape[0], chunk):
        f = sample_triplanes(pl, pts[None, i:i + chunk], levels=levels, box_warp=box_warp, plane_axes=plane_axes,
                             backend=backend)[0]
        sigma, rgb = reference.decode(f, w1.to(f), b1.to(f), w2.to(f), b2.to(f))
        dens.append(F.softplus(sigma + density_bias))
        cols.append(rgb)
    if not dens:
        return pts.new_zeros(0), pts.new_zeros(0, w2.shape[0] - 1)
    return torch.cat(dens), torch.cat(cols)


def grid_points(resolution: int, bbox: BBox = None, *, box_warp: float = 2.0, cell_centers: bool = False,
                device=None) -> Tensor:
    """Grid points [R,R,R,3] (world units), index [i,j,k] -> (x_i, y_j, z_k). cell_centers=False:
    x_i = lo + i (hi - lo) / (R - 1) (corners, both ends included; what marching cubes wants);
    True: the centres lo + (i + 0.5) (hi - lo) / R of R cells (voxels)."""
    if not (isinstance(resolution, int) and resolution >= 2):
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    lo, hi = _bbox(bbox, box_warp, device)
    i = torch.arange(resolution, dtype=torch.float64, device=lo.device)
    t = (i + 0.5) / resolution if cell_centers else i / (resolution - 1)
    axes = [lo[a] + t * (hi[a] - lo[a]) for a in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


@torch.no_grad()
def density_grid(planes, decoder, resolution: int, *, levels: int = 3, box_warp: float = 2.0,
                 plane_axes: str = "eg3d", density_bias: float = -1.0, bbox: BBox = None,
                 cell_centers: bool = False, chunk: int = 2 ** 18, backend: str = "auto") -> Tensor:
    """Density softplus(sigma + density_bias) [R,R,R] (float32, index [i,j,k] = point (x_i, y_j, z_k)
    of `grid_points`) of one scene. bbox ((xmin,ymin,zmin), (xmax,ymax,zmax)) defaults to the
    triplane box [-box_warp/2, box_warp/2]^3. Chunked (`chunk` points at a time), no gradient."""
    pts = grid_points(resolution, bbox, box_warp=box_warp, cell_centers=cell_centers)
    dens, _ = query_field(planes, decoder, pts.reshape(-1, 3).float(), levels=levels, box_warp=box_warp,
                          plane_axes=plane_axes, density_bias=density_bias, chunk=chunk, backend=backend)
    return dens.float().reshape(resolution, resolution, resolution)


# ---------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------


def _trimesh():
    try:
        import trimesh
    except ImportError as e:
        raise ImportError("mesh export needs trimesh: pip install 'g3dr[export]'") from e
    return trimesh


def _colors_u8(rgb: Tensor) -> np.ndarray:
    """rgb [N,3] in [0,1] -> RGBA uint8 [N,4]."""
    c = (rgb[:, :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.concatenate([c, np.full((c.shape[0], 1), 255, np.uint8)], 1)


@torch.no_grad()
def extract_mesh(planes, decoder, resolution: int = 256, iso: float = 10.0, bbox: BBox = None,
                 largest_component: bool = False, decimate: Optional[int] = None, *, levels: int = 3,
                 box_warp: float = 2.0, plane_axes: str = "eg3d", density_bias: float = -1.0,
                 chunk: int = 2 ** 18, backend: str = "auto"):
    """Triplanes -> density grid (`resolution`^3 over `bbox`) -> marching cubes (scikit-image, Lewiner)
    at density `iso` -> trimesh.Trimesh in world units, outward-facing, with per-vertex RGBA colour
    queried at the vertices.

    iso: a density (per world unit; density = softplus(sigma + density_bias)); the default 10 is
        opacity 1 - e^-1 over 0.1 units. The grid is closed off with zero density around the box, so
        the mesh is closed (watertight) even where the scene touches the box or crop.
    largest_component: keep only the connected component with the largest area.
    decimate: target face count (quadric decimation, needs fast-simplification); colours are queried
        after decimation, at the final vertices.
    Raises ValueError when the density never crosses `iso` (no surface), naming its range.
    """
    trimesh = _trimesh()
    try:
        from skimage.measure import marching_cubes
    except ImportError as e:
        raise ImportError("mesh export needs scikit-image: pip install 'g3dr[export]'") from e
    if not iso > 0:
        raise ValueError(f"iso must be a density > 0 (densities are softplus outputs, >= 0), got {iso}")
    if decimate is not None and not (isinstance(decimate, int) and decimate >= 4):
        raise ValueError(f"decimate must be a target face count >= 4, got {decimate!r}")
    kw = dict(levels=levels, box_warp=box_warp, plane_axes=plane_axes, density_bias=density_bias, chunk=chunk,
              backend=backend)
    vol = density_grid(planes, decoder, resolution, bbox=bbox, **kw)
    lo, hi = _bbox(bbox, box_warp, "cpu")
    vmin, vmax = float(vol.min()), float(vol.max())
    if not vmax > iso:
        raise ValueError(f"no surface: the density on the {resolution}^3 grid lies in [{vmin:.4g}, {vmax:.4g}], "
                         f"never above iso={iso}; lower iso or check the planes/decoder")
    spacing = ((hi - lo) / (resolution - 1)).numpy()
    vol = F.pad(vol, (1, 1, 1, 1, 1, 1), value=0.0)  # density 0 < iso outside: closes the surface
    verts, faces, _, _ = marching_cubes(vol.numpy(), level=iso, spacing=tuple(spacing), allow_degenerate=False)
    # padded index 0 sits one cell before lo; vertices in the padding cells (where the surface closes
    # off at the box or crop) are moved onto the box faces, so the cut is flat and inside the box
    verts = np.clip(verts + (lo.numpy() - spacing), lo.numpy(), hi.numpy())
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)
    if largest_component:
        parts = mesh.split(only_watertight=False)
        if len(parts) > 1:
            mesh = max(parts, key=lambda m: m.area)
    if decimate is not None:
        if decimate < len(mesh.faces):
            try:
                mesh = mesh.simplify_quadric_decimation(face_count=decimate)
            except ImportError as e:
                raise ImportError("decimation needs fast-simplification: pip install 'g3dr[export]'") from e
    if mesh.volume < 0:  # marching cubes orientation: make normals point out of the dense region
        mesh.invert()
    ref = planes if isinstance(planes, Tensor) else planes[0]
    pts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=ref.device)
    _, rgb = query_field(planes, decoder, pts, **kw)
    mesh.visual.vertex_colors = _colors_u8(rgb)
    return mesh


def mesh_points(mesh, n: int, seed: int = 0) -> Tensor:
    """n points [n,3] (float64, world units) sampled uniformly by area on a trimesh mesh, e.g. for
    `g3dr.metrics.chamfer` / `fscore` against points on the true surface."""
    trimesh = _trimesh()
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"mesh must be a non-empty trimesh.Trimesh, got {type(mesh).__name__}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    pts, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return torch.from_numpy(np.asarray(pts, dtype=np.float64))


def save_mesh(mesh, path: PathLike) -> Path:
    """Write a trimesh mesh as .glb, .obj or .ply (chosen by the extension; vertex colours kept),
    atomically. Unknown extension -> ValueError; missing or unwritable folder -> OSError naming it."""
    trimesh = _trimesh()
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"mesh must be a trimesh.Trimesh, got {type(mesh).__name__}")
    path = check_out(path, MESH_FORMATS, "mesh")
    ext = path.suffix.lower()[1:]
    data = mesh.export(file_type=ext, include_color=True) if ext == "obj" else mesh.export(file_type=ext)
    return write_bytes(path, data)


def _rays(name: str, r: Tensor, n: int) -> Tensor:
    if not isinstance(r, Tensor) or r.shape[-1:] != (3,) or r.numel() != n * 3:
        raise ValueError(f"{name} must hold one ray per pixel, [H*W,3], [H,W,3] or [1,H*W,3] with H*W={n}, "
                         f"got [{_shape(r)}]")
    return r.reshape(n, 3)


@torch.no_grad()
def depth_mesh(rgb: Tensor, depth: Tensor, rays_o: Tensor, rays_d: Tensor, max_edge_jump: float = 0.1,
               mask: Optional[Tensor] = None):
    """One view as a triangulated height field: vertex (r, c) = rays_o + depth * rays_d of pixel (r, c)
    with the colour rgb[:, r, c]; two triangles per 2x2 pixel block, facing the camera. A triangle is
    dropped when two of its vertices differ in depth by more than `max_edge_jump` (depth units; G3DR:
    distance along unit rays, the scene box spans 2) or when `mask` (bool [H,W], e.g. opacity > 0.5)
    excludes one of them; vertices no triangle uses are removed.

    rgb: [3,H,W] in [0,1]; depth: [H,W]; rays_o, rays_d: [H*W,3], [H,W,3] or [1,H*W,3] (row-major, as
    `g3dr_kernels.cameras.g3dr_rays` gives). Returns a trimesh.Trimesh (world units)."""
    trimesh = _trimesh()
    if not isinstance(depth, Tensor) or depth.dim() != 2:
        raise ValueError(f"depth must be [H,W], got [{_shape(depth)}]")
    H, W = depth.shape
    if H < 2 or W < 2:
        raise ValueError(f"depth_mesh needs at least 2x2 pixels, got [{_shape(depth)}]")
    if not isinstance(rgb, Tensor) or rgb.dim() != 3 or rgb.shape[1:] != depth.shape or rgb.shape[0] < 3:
        raise ValueError(f"rgb must be [3,H,W] matching depth [{H}x{W}], got [{_shape(rgb)}]")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != depth.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool [H,W] = [{H}x{W}] tensor, got [{_shape(mask)}] "
                         f"{getattr(mask, 'dtype', '')}")
    if not max_edge_jump > 0:
        raise ValueError(f"max_edge_jump must be > 0, got {max_edge_jump}")
    n = H * W
    o = _rays("rays_o", rays_o, n).double().cpu()
    d = _rays("rays_d", rays_d, n).double().cpu()
    z = depth.double().cpu().reshape(n)
    verts = o + z[:, None] * d
    idx = torch.arange(n).reshape(H, W)
    v00, v01, v10, v11 = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    # (v00, v10, v01) and (v01, v10, v11) wind counter-clockwise as seen from the camera
    tri = torch.cat([torch.stack([v00, v10, v01], -1).reshape(-1, 3), torch.stack([v01, v10, v11], -1).reshape(-1, 3)])
    tz = z[tri]
    keep = (tz.amax(1) - tz.amin(1) <= max_edge_jump) & torch.isfinite(tz).all(1)
    if mask is not None:
        keep &= mask.cpu().reshape(n)[tri].all(1)
    colors = _colors_u8(rgb[:3].detach().float().cpu().reshape(3, n).t())
    mesh = trimesh.Trimesh(vertices=verts.numpy(), faces=tri[keep].numpy(), vertex_colors=colors, process=False)
    mesh.remove_unreferenced_vertices()
    return mesh


# ---------------------------------------------------------------------------------------------
# Voxels
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def voxel_occupancy(planes, decoder, resolution: int, *, iso: float = 10.0, bbox: BBox = None, levels: int = 3,
                    box_warp: float = 2.0, plane_axes: str = "eg3d", density_bias: float = -1.0,
                    chunk: int = 2 ** 18, backend: str = "auto") -> Tensor:
    """Occupancy bool [N,N,N] of N^3 cubic cells over `bbox` (default the triplane box), index
    [i,j,k] = cell (x_i, y_j, z_k): density at the cell centre > iso (same density units as
    `extract_mesh`)."""
    dens = density_grid(planes, decoder, resolution, levels=levels, box_warp=box_warp, plane_axes=plane_axes,
                        density_bias=density_bias, bbox=bbox, cell_centers=True, chunk=chunk, backend=backend)
    return dens > iso


def _binvox_bytes(occ: np.ndarray, translate: Sequence[float], scale: float) -> bytes:
    """The binvox format (Patrick Min, https://www.patrickmin.com/binvox/binvox.html): an ASCII header,
    then (value, count <= 255) byte pairs run-length encoding the voxels with y fastest, then z,
    then x (index = x * D*D + z * D + y). Model coordinates: (index + 0.5) / D * scale + translate."""
    flat = np.ascontiguousarray(occ.transpose(0, 2, 1)).reshape(-1).astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    reps = (lengths + 254) // 255  # runs longer than 255 are split
    vals = np.repeat(values, reps)
    counts = np.full(vals.size, 255, np.int64)
    last = np.cumsum(reps) - 1
    counts[last] = lengths - 255 * (reps - 1)
    body = np.stack([vals, counts.astype(np.uint8)], 1).reshape(-1).tobytes()
    d = occ.shape
    header = (f"#binvox 1\ndim {d[0]} {d[1]} {d[2]}\ntranslate {translate[0]:.9g} {translate[1]:.9g} "
              f"{translate[2]:.9g}\nscale {scale:.9g}\ndata\n")
    return header.encode("ascii") + body


def save_voxels(path: PathLike, occ: Tensor, bbox: BBox = None, box_warp: float = 2.0) -> Path:
    """Write occupancy (bool [N,N,N], index [x,y,z]) atomically as .npy (the bool array), .npz
    (`occupancy` + `bbox_min`, `bbox_max`) or .binvox (cubic grids and a cubic bbox; translate = bbox
    min, scale = side). bbox defaults to the triplane box [-box_warp/2, box_warp/2]^3."""
    path = check_out(path, VOXEL_FORMATS, "voxel")
    if not isinstance(occ, (Tensor, np.ndarray)) or occ.ndim != 3 or occ.dtype not in (torch.bool, np.bool_):
        raise ValueError(f"occ must be a bool [N,N,N] grid, got [{_shape(occ)}] {getattr(occ, 'dtype', '')}")
    arr = occ.detach().cpu().numpy() if isinstance(occ, Tensor) else np.asarray(occ)
    lo, hi = (t.numpy() for t in _bbox(bbox, box_warp, "cpu"))
    ext = path.suffix.lower()
    if ext == ".npy":
        return atomic_write(path, lambda tmp: np.save(tmp, arr))
    if ext == ".npz":
        return atomic_write(path, lambda tmp: np.savez_compressed(tmp, occupancy=arr, bbox_min=lo, bbox_max=hi))
    side = hi - lo
    if len(set(arr.shape)) != 1 or not np.allclose(side, side[0], rtol=1e-6):
        raise ValueError(f"binvox stores cubic grids in a cubic box; got grid [{_shape(arr)}] and box sides {side}")
    return write_bytes(path, _binvox_bytes(arr, lo, float(side[0])))


def load_voxels(path: PathLike) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """Read what `save_voxels` writes -> (occupancy bool [N,N,N] indexed [x,y,z], bbox (min [3], max [3])
    or None for .npy). .binvox files from other tools load too (their translate/scale give the bbox)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VOXEL_FORMATS:
        raise ValueError(f"unknown voxel format {ext!r} for {path}; use one of {', '.join(VOXEL_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"voxel file not found: {path}")
    if ext == ".npy":
        return torch.from_numpy(np.load(path)).bool(), None
    if ext == ".npz":
        with np.load(path) as z:
            return (torch.from_numpy(z["occupancy"]).bool(),
                    (torch.from_numpy(z["bbox_min"]), torch.from_numpy(z["bbox_max"])))
    with open(path, "rb") as f:
        header = {}
        if not f.readline().startswith(b"#binvox"):
            raise ValueError(f"{path} is not a binvox file (no '#binvox' header)")
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: binvox header ends without a 'data' line")
            key, *vals = line.decode("ascii").split()
            if key == "data":
                break
            header[key] = [float(v) for v in vals]
        body = np.frombuffer(f.read(), np.uint8)
    dims = [int(v) for v in header.get("dim", [])]
    if len(dims) != 3 or body.size % 2:
        raise ValueError(f"{path}: corrupt binvox file (dim {dims}, {body.size} data bytes)")
    flat = np.repeat(body[0::2], body[1::2].astype(np.int64))
    if flat.size != math.prod(dims):
        raise ValueError(f"{path}: binvox data has {flat.size} voxels, dim {dims} needs {math.prod(dims)}")
    occ = flat.reshape(dims[0], dims[2], dims[1]).transpose(0, 2, 1).astype(bool)
    lo = torch.tensor(header.get("translate", [0.0, 0.0, 0.0]), dtype=torch.float64)
    scale = header.get("scale", [1.0])[0]
    return torch.from_numpy(np.ascontiguousarray(occ)), (lo, lo + scale)


# ---------------------------------------------------------------------------------------------
# Coloured depth
# ---------------------------------------------------------------------------------------------
# Chebyshev fits (on 2t - 1, t in [0,1]) to matplotlib's turbo (Google, Apache-2.0) and viridis
# (van der Walt & Smith, CC0) maps, made for this file; max error 0.018 (turbo) / 0.012 (viridis) per channel.
_CHEB = {
    "turbo": [[0.50371, 0.30685, -0.12251, -0.23374, -0.04734, 0.09622, -0.01572, -0.03693, 0.0242, 0.00198,
               -0.01471, 0.0075, 0.00522, -0.0098, 0.00067],
              [0.43441, -0.0958, -0.4633, 0.0685, 0.08128, 0.00378, -0.01237, -0.00335, -0.00339, 0.00014,
               0.00189, 0.00104, 0.00081, -0.00055, -0.00327],
              [0.35226, -0.35522, -0.12374, 0.22849, -0.14598, 0.04094, 0.04749, -0.02374, -0.01738, 0.00112,
               0.01168, 0.00633, -0.00725, -0.00485, 0.00748]],
    "viridis": [[0.40994, 0.30012, 0.2556, 0.08002, -0.03392, -0.02044, -0.00203, 0.0059, 0.00178, -0.00456, -0.00185],
                [0.5182, 0.45637, -0.058, -0.00477, -0.00855, 0.00089, 0.00212, 0.00097, -0.0004, 0.00025, 7e-05],
                [0.37542, -0.14514, -0.17034, 0.02303, 0.01618, 0.02995, 0.01551, 0.00541, 0.00458, 0.0017,
                 -0.00022]],
}


def _cmap_poly(name: str, t: np.ndarray) -> np.ndarray:
    x = 2 * t - 1
    return np.clip(np.stack([chebyshev.chebval(x, c) for c in _CHEB[name]], -1), 0, 1)


def apply_colormap(t: np.ndarray, cmap: str = "turbo", use_matplotlib: Optional[bool] = None) -> np.ndarray:
    """Values t in [0,1] (any shape) -> RGB floats [..., 3] in [0,1] through `cmap` ("turbo" or
    "viridis"): matplotlib's map when matplotlib is installed (use_matplotlib None or True), else the
    embedded Chebyshev approximation (use_matplotlib=False forces it)."""
    if cmap not in _CHEB:
        raise ValueError(f"cmap must be one of {sorted(_CHEB)}, got {cmap!r}")
    t = np.clip(np.asarray(t, dtype=np.float64), 0, 1)
    if use_matplotlib is not False:
        try:
            import matplotlib
            return np.asarray(matplotlib.colormaps[cmap](t))[..., :3]
        except ImportError:
            if use_matplotlib:
                raise ImportError("use_matplotlib=True but matplotlib is not installed") from None
    return _cmap_poly(cmap, t)


def colorize_depth(depth: Tensor, mask: Optional[Tensor] = None, percentiles: Tuple[float, float] = (2, 98),
                   cmap: str = "turbo", near_high: bool = True, background: Tuple[int, int, int] = (0, 0, 0),
                   use_matplotlib: Optional[bool] = None,
                   value_range: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Depth [H,W] -> uint8 [H,W,3] through a perceptual colour map over a robust range: the
    `percentiles` (in %) of the valid pixels (mask True and finite), or `value_range` (lo, hi) when
    given (one range for every frame of a video: no flicker), map to the ends of the map, values
    beyond are clamped. near_high: nearer pixels take the high end (turbo red, viridis yellow).
    Invalid pixels get `background`."""
    if not isinstance(depth, Tensor) or depth.dim() != 2:
        raise ValueError(f"depth must be [H,W], got [{_shape(depth)}]")
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    d = depth.detach().double().cpu()
    valid = torch.isfinite(d)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != depth.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [H,W] = [{_shape(depth)}] tensor, got [{_shape(mask)}]")
        valid &= mask.cpu()
    out = np.empty((*d.shape, 3), np.uint8)
    out[...] = np.asarray(background, np.uint8)
    if not valid.any():
        return out
    v = d[valid].numpy()
    lo, hi = np.percentile(v, [lo_p, hi_p]) if value_range is None else value_range
    t = np.full(v.shape, 0.5) if hi <= lo else (v - lo) / (hi - lo)
    if near_high:
        t = 1 - t
    out[valid.numpy()] = np.round(apply_colormap(t, cmap, use_matplotlib) * 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------


def _frames_u8(frames) -> np.ndarray:
    """Frames -> uint8 [T,H,W,3]. Accepts a tensor/array [T,H,W,3] or [T,3,H,W] (uint8, or floats in
    [0,1]), or a list of [H,W,3] / [3,H,W] frames."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("write_video: no frames")
        frames = torch.stack([torch.as_tensor(np.asarray(f) if not isinstance(f, Tensor) else f) for f in frames])
    x = torch.as_tensor(frames) if not isinstance(frames, Tensor) else frames.detach()
    if x.dim() != 4 or x.shape[0] < 1:
        raise ValueError(f"frames must be [T,H,W,3] or [T,3,H,W] with T >= 1, got [{_shape(x)}]")
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.permute(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"frames must have 3 colour channels, [T,H,W,3] or [T,3,H,W]; got [{_shape(x)}]")
    if x.is_floating_point():
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 or floats in [0,1], got {x.dtype}")
    return np.ascontiguousarray(x.cpu().numpy())


def write_video(frames, path: PathLike, fps: float = 24.0) -> Path:
    """Write frames (see `_frames_u8`: [T,H,W,3] / [T,3,H,W], uint8 or floats in [0,1]) as .mp4
    (H.264 yuv420p via imageio-ffmpeg, which bundles ffmpeg; H and W must be even) or .gif (PIL,
    looping; Pillow merges consecutive identical frames), atomically."""
    path = check_out(path, VIDEO_FORMATS, "video")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be > 0, got {fps}")
    arr = _frames_u8(frames)
    T, H, W, _ = arr.shape
    if path.suffix.lower() == ".gif":
        def w(tmp):
            ims = [Image.fromarray(f) for f in arr]
            ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=max(1, round(1000 / fps)),
                        loop=0)
        return atomic_write(path, w)
    if H % 2 or W % 2:
        raise ValueError(f"mp4 (H.264, yuv420p) needs even frame sizes, got {H}x{W}; crop or pad a pixel, or use .gif")
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (bundles the ffmpeg binary)
    except ImportError as e:
        raise ImportError("mp4 output needs imageio and imageio-ffmpeg: pip install 'g3dr[export]'") from e

    def w(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1, pixelformat="yuv420p") as wr:
            for f in arr:
                wr.append_data(f)
    return atomic_write(path, w)
