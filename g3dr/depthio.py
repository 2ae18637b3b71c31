"""G3DR's depth-file convention, in one place: `name_depth.png` is a 16-bit greyscale PNG with
depth = value / 65536 * 2 + 4 (so depths lie in [4, 6): distance along the ray from the canonical
camera at radius 5; larger = farther). `name_depth.npy` (float32 [H,W]) holds depth directly.
The 16 bits are decoded explicitly: an 8-bit PNG is an error, never silently rescaled."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

DEPTH_OFFSET = 4.0  # depth of value 0
DEPTH_RANGE = 2.0   # depth span of the 16-bit range
_SCALE = 65536.0


class DepthFileError(ValueError):
    """A depth file that is missing, unreadable or not in G3DR's convention."""


def read_depth_png(path: Union[str, Path]) -> torch.Tensor:
    """16-bit PNG -> depth [H,W] float32 in G3DR units (value / 65536 * 2 + 4)."""
    path = Path(path)
    if not path.is_file():
        raise DepthFileError(f"depth file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except Exception as e:  # PIL raises several types for corrupt files
        raise DepthFileError(f"cannot read depth file {path}: {e}") from e
    if mode in ("L", "P", "RGB", "RGBA", "LA", "1") or arr.dtype == np.uint8:
        raise DepthFileError(f"{path} is an 8-bit image (mode {mode}); G3DR depth maps are 16-bit greyscale PNGs "
                             f"(depth = value / 65536 * 2 + 4). Re-export it with 16 bits, e.g. `g3dr depth`.")
    if arr.ndim != 2:
        raise DepthFileError(f"{path}: expected a single-channel 16-bit depth image, got shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32)) / _SCALE * DEPTH_RANGE + DEPTH_OFFSET


def depth_to_uint16(depth: torch.Tensor) -> np.ndarray:
    """depth [H,W] in G3DR units -> uint16 values (clipped to the representable [4, 6 - 2/65536])."""
    v = ((depth.detach().float().cpu() - DEPTH_OFFSET) / DEPTH_RANGE * _SCALE).round()
    return v.clamp(0, 65535).numpy().astype(np.uint16)


def write_depth_png(path: Union[str, Path], depth: torch.Tensor) -> None:
    """depth [H,W] in G3DR units -> 16-bit PNG (atomic: temp file, then rename)."""
    if depth.dim() != 2:
        raise ValueError(f"write_depth_png: depth must be [H,W], got {tuple(depth.shape)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(depth_to_uint16(depth)).save(tmp)  # uint16 [H,W] -> mode I;16 (16-bit greyscale)
    tmp.replace(path)


def read_depth(path: Union[str, Path]) -> torch.Tensor:
    """`.png` (16-bit, G3DR convention) or `.npy` (float depth) -> [H,W] float32."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise DepthFileError(f"depth file not found: {path}")
        try:
            arr = np.load(path)
        except Exception as e:
            raise DepthFileError(f"cannot read depth file {path}: {e}") from e
        if arr.ndim != 2:
            raise DepthFileError(f"{path}: expected a [H,W] depth array, got shape {arr.shape}")
        return torch.from_numpy(arr.astype(np.float32))
    return read_depth_png(path)
