"""Datasets: the official folder layout and the built-in synthetic scenes, plus the step-indexed
batch sampler that makes data order a pure function of (seed, step, rank).

Folder layout (recursive): `name.jpg|jpeg|png` beside `name_depth.png` (16-bit, G3DR convention,
see g3dr/depthio.py) or `name_depth.npy` (float depth). Images are centre-cropped to a square and
resized to the model resolution; depth is resized with an antialiased bilinear filter. Item k >= N
is item k - N flipped horizontally (image and depth together).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .depthio import DepthFileError, read_depth
from .synthetic import SyntheticDataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """A problem with a training file or folder; the message names the file."""


def depth_path_for(image: Path) -> Optional[Path]:
    for suffix in ("_depth.png", "_depth.npy"):
        p = image.with_name(image.stem + suffix)
        if p.is_file():
            return p
    return None


def _centre_square(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top:top + s, left:left + s]


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x[None], size=(size, size), mode=mode, antialias=True, align_corners=False)[0]


def read_image(image_path: Path) -> torch.Tensor:
    """-> image [3,H,W] in [0,1]; DataError naming the file."""
    try:
        with Image.open(image_path) as im:
            im = im.convert("RGB")
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    except Exception as e:
        raise DataError(f"cannot read image {image_path}: {e}") from e


def fit_pair(img: torch.Tensor, dep: torch.Tensor, size: int, image_name,
             depth_name) -> Tuple[torch.Tensor, torch.Tensor]:
    """image [3,H,W], depth [1,H,W] -> both centre-cropped to a square and resized to size x size;
    DataError (naming the files) for mismatched sizes or non-finite depth."""
    if dep.shape[-2:] != img.shape[-2:]:
        raise DataError(f"image {image_name} is {img.shape[2]}x{img.shape[1]} but its depth {depth_name} is "
                        f"{dep.shape[2]}x{dep.shape[1]} (width x height); they must match")
    if not torch.isfinite(dep).all():
        raise DataError(f"depth {depth_name} contains NaN or inf")
    img = _resize(_centre_square(img), size, "bicubic").clamp(0, 1)
    dep = _resize(_centre_square(dep), size, "bilinear")
    return img, dep


def load_pair(image_path: Path, depth_path: Path, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> image [3,size,size] in [0,1], depth [1,size,size] (G3DR units); DataError naming the file."""
    img = read_image(image_path)
    try:
        dep = read_depth(depth_path)[None]
    except DepthFileError as e:
        raise DataError(str(e)) from e
    return fit_pair(img, dep, size, image_path, f"file {depth_path}")


def check_pair(image_path: Path, depth_path: Optional[Path]) -> Optional[str]:
    """What is wrong with a training pair, from the files' headers only (fast: no pixel is decoded),
    or None: missing depth, unreadable image or depth, 8-bit depth PNG, sizes that differ."""
    if depth_path is None:
        return f"missing depth file {image_path.stem}_depth.png (or _depth.npy) beside {image_path}"
    try:
        with Image.open(image_path) as im:
            size = im.size
    except Exception as e:
        return f"cannot read image {image_path}: {e}"
    try:
        if depth_path.suffix.lower() == ".npy":
            arr = np.load(depth_path, mmap_mode="r")
            if arr.ndim != 2:
                return f"{depth_path}: expected a [H,W] depth array, got shape {arr.shape}"
            dsize = (arr.shape[1], arr.shape[0])
        else:
            with Image.open(depth_path) as im:
                if im.mode in ("L", "P", "RGB", "RGBA", "LA", "1"):
                    return f"{depth_path} is an 8-bit image (mode {im.mode}); G3DR depth maps are 16-bit PNGs"
                dsize = im.size
    except Exception as e:
        return f"cannot read depth file {depth_path}: {e}"
    if dsize != size:
        return (f"image {image_path} is {size[0]}x{size[1]} but its depth {depth_path} is {dsize[0]}x{dsize[1]} "
                f"(width x height); they must match")
    return None


class FolderDataset(torch.utils.data.Dataset):
    """Images with depth maps in the official layout, searched recursively under `root`.

    Every pair's headers are checked up front (check_pair; fast). skip_bad=False: bad pairs (missing
    depth, unreadable image, 8-bit depth, size mismatch) raise one DataError naming them all.
    skip_bad=True: they are skipped, counted in `self.skipped` (path -> reason) and reported in one
    warning."""

    def __init__(self, root, size: int = 128, skip_bad: bool = False):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS
                        and not p.stem.endswith("_depth") and p.is_file())
        if not images:
            raise DataError(f"no images (.jpg/.jpeg/.png other than *_depth.png) under {self.root}")
        self.items: List[Tuple[Path, Path]] = []
        self.skipped: Dict[str, str] = {}
        for img in images:
            dep = depth_path_for(img)
            reason = check_pair(img, dep)
            if reason is not None:
                self.skipped[str(img)] = reason
                continue
            self.items.append((img, dep))
        if self.skipped and not skip_bad:
            reasons = list(self.skipped.values())
            raise DataError(f"{len(reasons)} bad file(s) under {self.root}: " + "; ".join(reasons[:5])
                            + (f"; ... ({len(reasons)} in all)" if len(reasons) > 5 else "")
                            + " (fix them, or data.skip_bad=true skips them)")
        if self.skipped:
            listing = "\n  ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:20])
            warnings.warn(f"skipped {len(self.skipped)} bad file(s) under {self.root} (data.skip_bad=true):\n  {listing}")
        if not self.items:
            raise DataError(f"no usable image/depth pairs under {self.root} ({len(self.skipped)} skipped)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        n = len(self.items)
        img_p, dep_p = self.items[k % n]
        img, dep = load_pair(img_p, dep_p, self.size)
        if k >= n:
            img, dep = img.flip(-1), dep.flip(-1)
        return {"image": img, "depth": dep, "index": torch.tensor(k)}


def build_dataset(cfg) -> torch.utils.data.Dataset:
    """The dataset named by cfg.data.source ("synthetic" or a folder)."""
    if cfg.data.source == "synthetic":
        return SyntheticDataset(cfg.data.synthetic_scenes, cfg.model.image_size, cfg.data.synthetic_seed,
                                cfg.render.radius, cfg.render.fov)
    return FolderDataset(cfg.data.source, cfg.model.image_size, cfg.data.skip_bad)


def global_batch(step: int, n: int, global_batch_size: int, seed: int, flip: bool) -> List[int]:
    """Item indices of the global batch at `step` (pure function): epochs are seeded permutations of
    the n items, consumed in order; with flip, each item is flipped (index + n) with probability 1/2,
    decided by (seed, step, position)."""
    out = []
    pos = step * global_batch_size
    while len(out) < global_batch_size:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(n - off, global_batch_size - len(out))
        out.extend(perm[off:off + take].tolist())
        pos += take
    if flip:
        g = torch.Generator().manual_seed(seed * 104729 + step)
        flips = torch.rand(global_batch_size, generator=g) < 0.5
        out = [i + n * int(f) for i, f in zip(out, flips.tolist())]
    return out


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of the global batch for steps start..steps-1, so resuming at any
    step, and any number of processes, sees the same data as an uninterrupted single run."""

    def __init__(self, n: int, batch_size: int, steps: int, start: int, seed: int, flip: bool, rank: int = 0,
                 world: int = 1):
        self.n, self.b, self.steps, self.start = n, batch_size, steps, start
        self.seed, self.flip, self.rank, self.world = seed, flip, rank, world

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start, self.steps):
            g = global_batch(step, self.n, self.b * self.world, self.seed, self.flip)
            yield g[self.rank * self.b:(self.rank + 1) * self.b]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

