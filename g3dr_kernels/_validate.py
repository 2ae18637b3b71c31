"""Input checks at the public boundary. Every failure names the shapes it saw.

Value checks (ascending depths, NaN) read tensor data, so they are skipped while
torch.compile traces (a data-dependent branch would break the graph).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Union

import torch

from ._types import PLANE_AXES, DepthKernel

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, t, ndim: int, last: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape [{_shape(t)}]")
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{name} must have last dim {last}, got shape [{_shape(t)}]")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Same device and dtype as `ref` for every tensor given."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def plane_axes_code(plane_axes: str) -> int:
    if plane_axes not in PLANE_AXES:
        raise ValueError(f"unknown plane_axes {plane_axes!r}; expected one of {tuple(PLANE_AXES)}")
    return PLANE_AXES[plane_axes]


# The kernels take scale = 2 / box_warp as a float32 (float64 on the float64 paths): it must be a
# normal float32, else points land at inf (tiny box_warp) or all at the centre (huge or inf box_warp).
_F32 = torch.finfo(torch.float32)
BOX_WARP_MIN, BOX_WARP_MAX = 2.0 / _F32.max, 2.0 / _F32.tiny


def check_box_warp(box_warp: float) -> None:
    if isinstance(box_warp, bool) or not isinstance(box_warp, (int, float)) or not math.isfinite(box_warp):
        raise ValueError(f"box_warp must be a finite positive number, got {box_warp!r}")
    if not BOX_WARP_MIN <= box_warp <= BOX_WARP_MAX:
        raise ValueError(f"box_warp must be in [{BOX_WARP_MIN:.3g}, {BOX_WARP_MAX:.3g}] (so that 2/box_warp is a "
                         f"normal float32), got {box_warp!r}")


def check_planes(planes: Union[torch.Tensor, Sequence[torch.Tensor]], levels: int) -> List[torch.Tensor]:
    """Validate `planes` ([B,3,C,H,W] or a finest-first list of them); returns the list form
    (a single tensor gives a one-element list; the pyramid is built by the caller)."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    if isinstance(planes, torch.Tensor):
        check_tensor("planes", planes, 5)
        if planes.shape[1] != 3:
            raise ValueError(f"planes must be [B,3,C,H,W], got [{_shape(planes)}]")
        if planes.shape[2] < 1:
            raise ValueError(f"planes need C >= 1 channels, got [{_shape(planes)}]")
        H, W = planes.shape[-2:]
        f = 2 ** (levels - 1)
        if H // f < 1 or W // f < 1:
            raise ValueError(
                f"planes of size {H}x{W} are too small for {levels} levels (the coarsest would be "
                f"{H // f}x{W // f}); pass fewer levels or larger planes")
        return [planes]
    if not isinstance(planes, (list, tuple)) or len(planes) == 0:
        raise TypeError(f"planes must be a tensor [B,3,C,H,W] or a non-empty list of them, got {type(planes).__name__}")
    if len(planes) != levels:
        raise ValueError(f"a pyramid of {len(planes)} levels was passed with levels={levels}; they must agree")
    first = planes[0]
    for i, p in enumerate(planes):
        check_tensor(f"planes[{i}]", p, 5)
        if p.shape[:3] != first.shape[:3] or p.shape[1] != 3:
            raise ValueError(
                f"pyramid levels must all be [B,3,C,H,W] with the same B and C; got "
                f"{[ '[' + _shape(q) + ']' for q in planes]}")
        if p.shape[-1] < 1 or p.shape[-2] < 1 or p.shape[2] < 1:
            raise ValueError(f"planes[{i}] has an empty plane or no channels (C = 0): [{_shape(p)}]")
        check_same("planes[0]", first, **{f"planes[{i}]": p})
    return list(planes)


def check_xyz(xyz: torch.Tensor, planes0: torch.Tensor) -> None:
    check_tensor("xyz", xyz, 3, last=3)
    if xyz.shape[0] != planes0.shape[0]:
        raise ValueError(f"xyz [{_shape(xyz)}] and planes [{_shape(planes0)}] disagree on batch size B")
    if xyz.device != planes0.device:
        raise ValueError(f"xyz is on {xyz.device} but planes are on {planes0.device}")
    half = (torch.float16, torch.bfloat16)
    if xyz.dtype != planes0.dtype and not (planes0.dtype in half and xyz.dtype == torch.float32):
        raise TypeError(f"xyz has dtype {xyz.dtype} but planes have {planes0.dtype} (only fp16/bf16 planes may "
                        f"take float32 points)")


def check_composite(sigma, rgb, depths, target_depth, kernel) -> None:
    check_tensor("sigma", sigma, 3)
    check_tensor("rgb", rgb, 4)
    check_tensor("depths", depths, 3)
    if rgb.shape[:3] != sigma.shape or depths.shape != sigma.shape:
        raise ValueError(
            f"expected sigma [B,R,S], rgb [B,R,S,D], depths [B,R,S] with equal B,R,S; got sigma "
            f"[{_shape(sigma)}], rgb [{_shape(rgb)}], depths [{_shape(depths)}]")
    if rgb.shape[3] < 1:
        raise ValueError(f"rgb needs D >= 1 channels, got [{_shape(rgb)}]")
    check_same("sigma", sigma, rgb=rgb, depths=depths)
    check_depths(depths, target_depth, kernel)


def check_depths(depths, target_depth, kernel) -> None:
    """target_depth [B,R] matching depths [B,R,S]; depths ascending and NaN-free."""
    B, R, S = depths.shape
    if S < 2:
        raise ValueError(f"compositing needs S >= 2 samples per ray, got depths [{_shape(depths)}]")
    if target_depth is not None:
        check_tensor("target_depth", target_depth, 2)
        if target_depth.shape != depths.shape[:2]:
            raise ValueError(f"target_depth must be [B,R] = [{B}x{R}], got [{_shape(target_depth)}]")
        check_same("depths", depths, target_depth=target_depth)
    if not isinstance(kernel, DepthKernel):
        raise TypeError(f"kernel must be a DepthKernel, got {type(kernel).__name__}")
    if not _compiling() and depths.numel() > 0:
        if not torch.isfinite(depths).all():
            raise ValueError(f"depths [{_shape(depths)}] contain NaN or inf; sample depths must be finite")
        if (depths[..., 1:] < depths[..., :-1]).any():
            raise ValueError(f"depths [{_shape(depths)}] must be ascending along the last dim")
        if target_depth is not None and not torch.isfinite(target_depth).all():
            raise ValueError(f"target_depth [{_shape(target_depth)}] contains NaN or inf; it must be finite")


def check_decoder(w1, b1, w2, b2, C: int, ref: torch.Tensor) -> None:
    check_tensor("w1", w1, 2)
    check_tensor("b1", b1, 1)
    check_tensor("w2", w2, 2)
    check_tensor("b2", b2, 1)
    Hd = w1.shape[0]
    if w1.shape[1] != C or b1.shape[0] != Hd or w2.shape[1] != Hd or b2.shape[0] != w2.shape[0] or w2.shape[0] < 2:
        raise ValueError(
            f"decoder shapes must be w1 [hidden,C={C}], b1 [hidden], w2 [1+D,hidden] (D >= 1), b2 [1+D]; got "
            f"w1 [{_shape(w1)}], b1 [{_shape(b1)}], w2 [{_shape(w2)}], b2 [{_shape(b2)}]")
    check_same("w1", w1, b1=b1, w2=w2, b2=b2)
    if w1.device != ref.device:
        raise ValueError(f"decoder weights are on {w1.device} but planes are on {ref.device}")
    if w1.dtype != ref.dtype:
        raise TypeError(f"decoder weights are {w1.dtype} but planes are {ref.dtype}; the fused renderer takes one "
                        f"dtype for planes, rays, depths and decoder (cast them, e.g. w1.to(planes.dtype))")


def check_rays(rays_o, rays_d, depths, planes0) -> None:
    check_tensor("rays_o", rays_o, 3, last=3)
    check_tensor("rays_d", rays_d, 3, last=3)
    check_tensor("depths", depths, 3)
    if rays_o.shape != rays_d.shape or depths.shape[:2] != rays_o.shape[:2] or rays_o.shape[0] != planes0.shape[0]:
        raise ValueError(
            f"expected rays_o [B,R,3], rays_d [B,R,3], depths [B,R,S] with planes [B,...]; got rays_o "
            f"[{_shape(rays_o)}], rays_d [{_shape(rays_d)}], depths [{_shape(depths)}], planes [{_shape(planes0)}]")
    check_same("rays_o", rays_o, rays_d=rays_d, depths=depths)
    if rays_o.device != planes0.device:
        raise ValueError(f"rays are on {rays_o.device} but planes are on {planes0.device}")
    if rays_o.dtype != planes0.dtype:
        raise TypeError(f"rays and depths are {rays_o.dtype} but planes are {planes0.dtype}; the fused renderer "
                        f"takes one dtype for planes, rays, depths and decoder")
