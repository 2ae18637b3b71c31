"""G3DR's model: f_trigen, the U-Net that turns an RGB-D image into a triplane, and the `G3DR`
module that owns it with the triplane decoder and renderer (g3dr_kernels).

The U-Net has the official shape (a denoising-diffusion style U-Net run at a constant "time"):
input RGB in [-1,1] + raw depth, concatenated with a learned positional embedding; a 7x7 stem;
per level two ResNet blocks (weight-standardised 3x3 convs, GroupNorm, SiLU, a per-block
scale/shift from the constant time embedding) and linear attention; full attention in the middle;
a mirrored decoder with skip connections; a final ResNet block and a 1x1 conv to 3*C channels.
Parameter names follow the official checkpoint's, so `load_official_checkpoint` maps it directly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from g3dr_kernels import DepthKernel, reference
from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays
from g3dr_kernels.nn import TriplaneDecoder, TriplaneRenderer

from .config import Config, ModelConfig
from .metrics import density_scaled_rays


def _std_weight(w: torch.Tensor) -> torch.Tensor:
    eps = 1e-5 if w.dtype == torch.float32 else 1e-3
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (w - mean) * (var + eps).rsqrt()


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution (Qiao et al. 2019): each filter normalised to zero mean, unit variance."""

    def forward(self, x):
        return F.conv2d(x, _std_weight(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ChannelNorm(nn.Module):
    """Layer norm over channels of [B,C,H,W] with a learned gain `g` [1,C,1,1] and no bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class PreNormResidual(nn.Module):
    """x + fn(norm(x)); submodules named `fn.norm`, `fn.fn` as in the official checkpoint."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = nn.Module()
        self.fn.norm, self.fn.fn = ChannelNorm(dim), fn

    def forward(self, x):
        return x + self.fn.fn(self.fn.norm(x))


class ConvBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = WSConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            x = x * (scale_shift[0] + 1) + scale_shift[1]
        return F.silu(x)


class ResBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1 = ConvBlock(dim, dim_out, groups)
        self.block2 = ConvBlock(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, t):
        scale_shift = self.mlp(t)[:, :, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, scale_shift)) + self.res_conv(x)


class LinearAttention(nn.Module):
    """Efficient attention (Shen et al. 2021): softmax over features for q, over positions for k; O(HW)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChannelNorm(dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Full softmax self-attention over positions (the U-Net's middle)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w).transpose(-1, -2) for t in self.to_qkv(x).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, d]; scale 1/sqrt(d)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class Downsample(nn.Sequential):
    """Space-to-depth (2x2 -> channels) then a 1x1 conv; the parameters sit at index 1."""

    def __init__(self, dim: int, dim_out: int):
        # PixelUnshuffle orders channels (c, p1, p2), as the official rearrange does
        super().__init__(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


class Upsample(nn.Sequential):
    def __init__(self, dim: int, dim_out: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        e = t[:, None].float() * freqs[None]
        return torch.cat([e.sin(), e.cos()], dim=-1)


class TriplaneUNet(nn.Module):
    """f_trigen: image [B,3,H,W] in [-1,1] and depth [B,1,H,W] -> planes [B,3,C,H,W]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim, mults, g = cfg.base_width, cfg.width_mults, cfg.groups
        heads, dh = cfg.attn_heads, cfg.attn_dim_head
        self.pos_embed = nn.Parameter(torch.ones(1, cfg.pos_channels, cfg.image_size, cfg.image_size))
        self.init_conv = nn.Conv2d(cfg.in_channels + cfg.pos_channels, dim, 7, padding=3)
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        dims = [dim, *(dim * m for m in mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, (din, dout) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResBlock(din, din, time_dim, g), ResBlock(din, din, time_dim, g),
                PreNormResidual(din, LinearAttention(din, heads, dh)),
                nn.Conv2d(din, dout, 3, padding=1) if last else Downsample(din, dout)]))
        mid = dims[-1]
        self.mid_block1 = ResBlock(mid, mid, time_dim, g)
        self.mid_attn = PreNormResidual(mid, Attention(mid, heads, dh))
        self.mid_block2 = ResBlock(mid, mid, time_dim, g)
        for i, (din, dout) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                ResBlock(dout + din, dout, time_dim, g), ResBlock(dout + din, dout, time_dim, g),
                PreNormResidual(dout, LinearAttention(dout, heads, dh)),
                nn.Conv2d(dout, din, 3, padding=1) if last else Upsample(dout, din)]))
        self.final_res_block = ResBlock(dim * 2, dim * 2, time_dim, g)
        self.final_conv = nn.Conv2d(dim * 2, 3 * cfg.plane_channels, 1)

    def forward(self, image: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        B, _, H, W = image.shape
        if (H, W) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"f_trigen was built for {self.cfg.image_size}x{self.cfg.image_size} inputs, got {H}x{W}")
        x = torch.cat([image, depth, self.pos_embed.expand(B, -1, -1, -1).to(image.dtype)], dim=1)
        x = self.init_conv(x)
        r = x
        t = self.time_mlp(torch.ones(B, device=x.device))
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = attn(block2(x, t))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], 1), t)
            x = attn(block2(torch.cat([x, skips.pop()], 1), t))
            x = up(x)
        x = self.final_conv(self.final_res_block(torch.cat([x, r], 1), t))
        return x.reshape(B, 3, self.cfg.plane_channels, H, W)


def image_plane_orientation(plane_axes: str, radius: float, fov: float, box_warp: float = 2.0
                            ) -> Tuple[Tuple[bool, bool, bool], ...]:
    """How to turn a grid laid out like the input image ([rows, cols]) into each plane, so that the
    plane axes line up with the image: per plane (transpose, flip_rows, flip_cols), applied in that order.

    Found by projecting the canonical camera's pixels with the renderer's own `project`: each plane
    coordinate (w, h) is driven by an image axis (row or column) or by depth along the view. The
    plane axis driven by image rows takes the grid's rows, by columns its columns, and a depth axis
    the grid axis left over; a flip where the plane coordinate falls as its grid index rises.
    G3DR's canonical camera looks along +x: with "xyz" axes the (y, z) plane is the image itself,
    turned; (x, y) and (x, z) keep the image's rows / columns and put depth on the other grid axis.
    """
    n = 8
    o, d = g3dr_rays(g3dr_cam2world(math.pi / 2, math.pi / 2, radius, dtype=torch.float64), fov, n)
    pts = o + radius * d                                       # [1, n*n, 3] pixels on the sphere through the origin
    deeper = o + (radius + 0.25) * d
    uv = reference.project(pts, box_warp, plane_axes)[0].reshape(3, n, n, 2)          # [plane, row, col, (w, h)]
    uv_deep = reference.project(deeper, box_warp, plane_axes)[0].reshape(3, n, n, 2)
    out = []
    for p in range(3):
        grads = {"row": (uv[p, -1] - uv[p, 0]).mean(0), "col": (uv[p, :, -1] - uv[p, :, 0]).mean(0),
                 "depth": (uv_deep[p] - uv[p]).mean((0, 1))}                        # each [2] = (dw, dh)
        drive = []
        for k in range(2):  # k = 0: w, 1: h; the image axis that moves it most ("depth" when neither does)
            best = max(("row", "col"), key=lambda a: abs(float(grads[a][k])))
            drive.append(best if abs(float(grads[best][k])) > 4 * abs(float(grads["depth"][k])) else "depth")
        w_by, h_by = drive
        if w_by == h_by:
            raise ValueError(f"plane_layout='image': plane {p} of plane_axes={plane_axes!r} has both axes driven "
                             f"by {w_by}; it cannot be aligned with the image")
        transpose = w_by == "row" or h_by == "col"
        flip_rows = float(grads[h_by][1]) < 0
        flip_cols = float(grads[w_by][0]) < 0
        out.append((transpose, flip_rows, flip_cols))
    return tuple(out)


def orient_planes(grid: torch.Tensor, orientation) -> torch.Tensor:
    """grid [B,3,C,H,W] in image layout -> planes [B,3,C,H,W] (see image_plane_orientation). Square grids only."""
    planes = []
    for p, (transpose, flip_rows, flip_cols) in enumerate(orientation):
        g = grid[:, p]
        g = g.transpose(-1, -2) if transpose else g
        dims = [d for d, f in ((-2, flip_rows), (-1, flip_cols)) if f]
        planes.append(g.flip(dims) if dims else g)
    return torch.stack(planes, 1)


def splat_planes(feats: torch.Tensor, uv: torch.Tensor, height: int, width: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinear splat, the transpose of the renderer's bilinear sample (align_corners=False, nothing
    outside the grid): feats [B,3,N,C] (one feature per point and plane), uv [B,3,N,2] plane coordinates
    in [-1,1] in grid_sample order (w, h) -> (summed features [B,3,C,H,W], summed weights [B,3,1,H,W])."""
    B, P, N, C = feats.shape
    if uv.shape != (B, P, N, 2):
        raise ValueError(f"splat_planes: uv must be [B,3,N,2] = {[B, P, N, 2]}, got {list(uv.shape)}")
    tx = ((uv[..., 0] + 1) * width - 1) / 2                       # texel coordinates, centres at integers
    ty = ((uv[..., 1] + 1) * height - 1) / 2
    x0, y0 = tx.floor(), ty.floor()
    fx, fy = tx - x0, ty - y0
    base = torch.arange(B * P, device=feats.device).reshape(B, P, 1) * (height * width)
    out = feats.new_zeros(B * P * height * width, C)
    wsum = feats.new_zeros(B * P * height * width)
    src = feats.reshape(-1, C)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        x, y = x0 + dx, y0 + dy
        w = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        w = w * ((x >= 0) & (x < width) & (y >= 0) & (y < height)).to(w.dtype)
        idx = (base + y.clamp(0, height - 1).long() * width + x.clamp(0, width - 1).long()).reshape(-1)
        w = w.reshape(-1)
        out.index_add_(0, idx, src * w[:, None].to(src.dtype))
        wsum.index_add_(0, idx, w.to(wsum.dtype))
    out = out.reshape(B, P, height, width, C).permute(0, 1, 4, 2, 3)
    return out, wsum.reshape(B, P, 1, height, width)


class PlaneLift(nn.Module):
    """model.plane_layout="lift": the U-Net's output grids are laid out like the input image; each
    pixel's features (one vector per plane) are placed at the pixel's 3D point (canonical ray x input
    depth), projected into each plane with the renderer's own `project` and splatted bilinearly, then
    averaged per texel. The frontal plane then holds the image at the right scale for every depth, and
    the side planes hold each pixel's features at its depth, which a U-Net cannot place by itself (a
    scatter along depth). A small residual conv per plane (fed the coverage as well, its last layer
    zero-initialised) spreads the features into texels no pixel reached (hidden parts, the box rim)."""

    def __init__(self, channels: int, size: int, plane_axes: str, radius: float, fov: float, box_warp: float,
                 hidden: int = 0):
        super().__init__()
        self.size, self.plane_axes, self.box_warp = size, plane_axes, box_warp
        o, d = g3dr_rays(g3dr_cam2world(math.pi / 2, math.pi / 2, radius), fov, size)
        self.register_buffer("rays_o", o, persistent=False)          # [1, size*size, 3] canonical rays
        self.register_buffer("rays_d", d, persistent=False)
        h = hidden or channels
        P = 3  # one conv stack per plane (grouped convolutions)
        self.refine = nn.Sequential(nn.Conv2d(P * (channels + 1), P * h, 3, padding=1, groups=P), nn.SiLU(),
                                    nn.Conv2d(P * h, P * h, 3, padding=2, dilation=2, groups=P), nn.SiLU(),
                                    nn.Conv2d(P * h, P * channels, 3, padding=1, groups=P))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def splat(self, grid: torch.Tensor, depth: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """grid [B,3,C,H,W] in image layout, depth [B,1,H,W] (distance along the canonical rays)
        -> (planes [B,3,C,H,W]: per-texel mean of the splatted features, coverage [B,3,1,H,W]: summed weights)."""
        B, P, C, H, W = grid.shape
        if (H, W) != (self.size, self.size) or depth.shape != (B, 1, H, W):
            raise ValueError(f"plane lift: expected grid [B,3,C,{self.size},{self.size}] and depth [B,1,{self.size},"
                             f"{self.size}], got {list(grid.shape)} and {list(depth.shape)}")
        pts = self.rays_o + depth.reshape(B, H * W, 1).to(self.rays_d.dtype) * self.rays_d      # [B, N, 3]
        uv = reference.project(pts, self.box_warp, self.plane_axes)                              # [B, 3, N, 2]
        feats = grid.reshape(B, P, C, H * W).transpose(2, 3)                                     # [B, 3, N, C]
        summed, wsum = splat_planes(feats, uv.to(feats.dtype), H, W)
        return summed / wsum.clamp_min(1e-3), wsum

    def forward(self, grid: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        planes, wsum = self.splat(grid, depth)
        B, P, C, H, W = planes.shape
        x = torch.cat([planes, wsum.clamp_max(1.0)], 2).reshape(B, P * (C + 1), H, W)
        return planes + self.refine(x).reshape(B, P, C, H, W)


# A kernel equal to 1 everywhere: target samples are still taken, no gradient is rescaled.
_NO_KERNEL = DepthKernel(s1=1.0, s2=1.0, c_min=1.0, c_max=1.0)


class G3DR(nn.Module):
    """Generator + decoder + renderer. `forward` is the one call the trainer makes per step, so DDP
    sees every parameter: image [B,3,H,W] in [0,1], depth [B,1,H,W] (G3DR units), rays [B,R,3],
    optional target_depth [B,R] (canonical view: target samples + depth-kernel gradient scaling)
    -> {"planes" [B,3,C,H,W], "rgb" [B,R,3] in [0,1], "depth" [B,R], "opacity" [B,R]}."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m, r = cfg.model, cfg.render
        self.generator = TriplaneUNet(m)
        self.decoder = TriplaneDecoder(m.plane_channels, m.decoder_hidden, 3, lr_multiplier=m.decoder_lr_mul)
        self.renderer = self.make_renderer()
        # plane_layout="image": the U-Net's output grids are laid out like the input image, turned here
        self.orientation = (image_plane_orientation(r.plane_axes, r.radius, r.fov, r.box_warp)
                            if m.plane_layout == "image" else None)
        # plane_layout="lift": each pixel's features placed at its 3D point in every plane
        self.lift = (PlaneLift(m.plane_channels, m.image_size, r.plane_axes, r.radius, r.fov, r.box_warp)
                     if m.plane_layout == "lift" else None)

    def make_renderer(self, n_coarse: Optional[int] = None, n_fine: Optional[int] = None,
                      backend: Optional[str] = None, sampling: Optional[str] = None) -> TriplaneRenderer:
        """A TriplaneRenderer on this model's decoder with the config's options (sample counts, backend
        and sampling overridable, e.g. 64+64 deterministic samples for stills)."""
        r = self.cfg.render
        given = dict(n_coarse=n_coarse, n_fine=n_fine, backend=backend or None, sampling=sampling)
        # depth_kernel=False (the ablation) keeps the target samples but scales no gradient
        kernel = r.kernel() if r.depth_kernel else _NO_KERNEL
        return TriplaneRenderer(self.decoder, r.renderer_options(**{k: v for k, v in given.items() if v is not None}),
                                kernel=kernel)

    def planes(self, image: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """image [B,3,H,W] in [0,1], depth [B,1,H,W] -> planes [B,3,C,H,W] (float32)."""
        grid = self.generator(image * 2 - 1, depth).float()
        if self.lift is not None:
            return self.lift(grid, depth.float())
        return grid if self.orientation is None else orient_planes(grid, self.orientation)

    def forward(self, image, depth, rays_o, rays_d, target_depth=None, generator=None, return_weights: bool = False
                ) -> Dict[str, torch.Tensor]:
        """-> {"planes", "rgb", "depth", "opacity"}; with return_weights also "weights" [B,R,S-1] and the
        interval mid depths "t_mid" [B,R,S-1] (for the free-space loss)."""
        planes = self.planes(image, depth)
        with torch.autocast(rays_o.device.type, enabled=False):  # the renderer runs in float32
            o, d = rays_o.float(), rays_d.float()
            depths, noise = self.renderer.render_depths(planes, o, d, target_depth, generator)
            out = self.renderer.render_at(planes, o, d, depths, target_depth, return_weights, noise)
        res = {"planes": planes, "rgb": out.rgb, "depth": out.depth, "opacity": out.opacity}
        if return_weights:
            res.update(weights=out.weights, t_mid=(depths[..., 1:] + depths[..., :-1]) / 2)
        return res

    def set_kernel(self, on: bool) -> None:
        """Switch the depth-kernel gradient scaling (render.depth_kernel) on or off for the next steps
        (render.kernel_start: off at first, then on)."""
        r = self.cfg.render
        self.renderer.kernel = r.kernel() if on and r.depth_kernel else _NO_KERNEL

    @torch.no_grad()
    def reconstruct(self, image, depth) -> torch.Tensor:
        """image [B,3,H,W] (or [3,H,W]) in [0,1], depth [B,1,H,W] (or [1,H,W] / [H,W]) in G3DR units,
        at the model's resolution -> planes [B,3,C,H,W]. image and depth may also be file paths (an image,
        and its G3DR depth file: 16-bit PNG or .npy), read and fitted to the model's size as
        `g3dr render` does."""
        if isinstance(image, (str, Path)) or isinstance(depth, (str, Path)):
            if not (isinstance(image, (str, Path)) and isinstance(depth, (str, Path))):
                raise TypeError("reconstruct: give image and depth both as tensors or both as file paths")
            from .data import load_pair
            image, depth = load_pair(Path(image), Path(depth), self.cfg.model.image_size)
        image = image[None] if image.dim() == 3 else image
        depth = depth[None, None] if depth.dim() == 2 else (depth[None] if depth.dim() == 3 else depth)
        s = self.cfg.model.image_size
        if image.shape[1:] != (3, s, s) or depth.shape[1:] != (1, s, s) or image.shape[0] != depth.shape[0]:
            raise ValueError(f"reconstruct: this model takes image [B,3,{s},{s}] and depth [B,1,{s},{s}], got "
                             f"{list(image.shape)} and {list(depth.shape)}")
        if not torch.isfinite(depth).all():
            raise ValueError("reconstruct: depth contains NaN or inf")
        dev = next(self.parameters()).device
        return self.planes(image.to(dev).float(), depth.to(dev).float())

    def still_samples(self) -> Tuple[int, int]:
        """Default (n_coarse, n_fine) for stills, videos and scores: twice the training counts."""
        return 2 * self.cfg.render.n_coarse, 2 * self.cfg.render.n_fine

    @torch.no_grad()
    def render(self, planes: torch.Tensor, cameras, resolution: Optional[int] = None, *, n_coarse: Optional[int] = None,
               n_fine: Optional[int] = None, sigma_scale: float = 1.0, chunk: int = 16384,
               backend: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """planes [1 or N,3,C,H,W]; cameras: cam2world [N,4,4] (G3DR's OpenGL frame) or a (yaw [N], pitch [N])
        pair in radians -> {"rgb" [N,3,R,R] in [0,1], "depth" [N,1,R,R], "opacity" [N,1,R,R]}, R = resolution
        (default: the training resolution). Chunked over rays, so any resolution fits in memory.
        n_coarse, n_fine: samples per ray (default: twice the training counts, `still_samples`; `g3dr render`
        uses the same). sigma_scale multiplies the density field (the paper's Table S1), exactly: rays are
        rescaled."""
        r = self.cfg.render
        res = resolution or self.cfg.model.image_size
        dev = planes.device
        if isinstance(cameras, (tuple, list)):
            cameras = g3dr_cam2world(cameras[0], cameras[1], r.radius, device=dev)
        if cameras.dim() != 3 or cameras.shape[1:] != (4, 4):
            raise ValueError(f"render: cameras must be cam2world [N,4,4] or (yaw, pitch), got {list(cameras.shape)}")
        N = cameras.shape[0]
        if planes.dim() != 5 or planes.shape[0] not in (1, N):
            raise ValueError(f"render: planes must be [1 or N={N},3,C,H,W], got {list(planes.shape)}")
        # stills: "uniform" sampling, which is deterministic in eval mode (EG3D's always jitters: flicker)
        dc, df = self.still_samples()
        renderer = self.make_renderer(dc if n_coarse is None else n_coarse, df if n_fine is None else n_fine, backend,
                                      sampling="uniform").eval()
        rays_o, rays_d = g3dr_rays(cameras.to(dev).float(), r.fov, res)
        rays_d, _ = density_scaled_rays(rays_d, sigma_scale)  # exact: the depth comes out x s, divided below
        outs = {"rgb": [], "depth": [], "opacity": []}
        for i in range(N):
            p = planes[i:i + 1] if planes.shape[0] == N else planes
            parts = [renderer(p, rays_o[i:i + 1, a:a + chunk], rays_d[i:i + 1, a:a + chunk])
                     for a in range(0, res * res, chunk)]
            outs["rgb"].append(torch.cat([o.rgb for o in parts], 1))
            outs["depth"].append(torch.cat([o.depth for o in parts], 1) / sigma_scale)
            outs["opacity"].append(torch.cat([o.opacity for o in parts], 1))
        cat = {k: torch.cat(v, 0) for k, v in outs.items()}  # rgb [N,R*R,3]; depth, opacity [N,R*R]
        return {k: (v if v.dim() == 3 else v[..., None]).transpose(1, 2).reshape(N, -1, res, res)
                for k, v in cat.items()}


# ---------------------------------------------------------------------------------------------
# Official checkpoints (preddy5/G3DR `checkpoint_generic.pt`)
# ---------------------------------------------------------------------------------------------

_DECODER_KEYS = {"decoder.net.0.weight": "decoder.weight1", "decoder.net.0.bias": "decoder.bias1",
                 "decoder.net.2.weight": "decoder.weight2", "decoder.net.2.bias": "decoder.bias2"}


def official_to_ours(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official Unet state dict (optionally with DDP's `module.` prefix) -> G3DR state dict keys."""
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        ours = _DECODER_KEYS.get(k, k if k.startswith("decoder.") else "generator." + k)
        out[ours] = v
        if ours.startswith("decoder."):  # the renderer holds the same decoder module
            out["renderer." + ours] = v
    return out


def load_official_checkpoint(model: G3DR, path: Union[str, Path, Dict]) -> None:
    """Load an official G3DR checkpoint (`{'model': state_dict, ...}` or a bare state dict) into
    `model` (built with the `official` preset). Raises ValueError listing missing/unexpected keys
    and shape mismatches."""
    if isinstance(path, dict):
        ckpt = path
    else:  # weights_only: an official checkpoint is tensors and numbers; anything else is refused, not run
        from .files import torch_load
        ckpt = torch_load(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a G3DR checkpoint (expected a dict with a 'model' state dict)")
    mapped = official_to_ours(state)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(mapped))
    unexpected = sorted(set(mapped) - set(ours))
    shapes = sorted(f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(ours[k].shape)}"
                    for k in set(ours) & set(mapped) if mapped[k].shape != ours[k].shape)
    if missing or unexpected or shapes:
        def head(xs):
            return ", ".join(xs[:12]) + (f", ... ({len(xs)} in all)" if len(xs) > 12 else "")
        raise ValueError("official checkpoint does not match the model (build it with the 'official' preset):"
                         + (f"\n  missing keys: {head(missing)}" if missing else "")
                         + (f"\n  unexpected keys: {head(unexpected)}" if unexpected else "")
                         + (f"\n  shape mismatches: {head(shapes)}" if shapes else ""))
    model.load_state_dict(mapped)
