"""Drop-in replacements for EG3D's `ImportanceRenderer` and G3DR's extension of it, running the fused
kernels. Written from the official formulas (EG3D: training/volumetric_rendering/renderer.py,
math_utils.py, ray_marcher.py, triplane.py; G3DR: train.py, src/unet.py); no official code is
included (EG3D's is under a non-commercial licence).

The two-line swap:

    # from training.volumetric_rendering.renderer import ImportanceRenderer
    from g3dr_kernels.compat import EG3DImportanceRenderer as ImportanceRenderer   # (or G3DRImportanceRenderer)

Same call (`forward(planes, decoder, ray_origins, ray_directions, rendering_options[, importance_depth])`),
same option dict, same returns (rgb in [-1, 1] [B,R,D], depth [B,R,1], weight_total [B,R,1], and for
G3DR depths_mid [B,R,S-1,1]), and the same random calls in the same order, shapes and dtypes as the
official code (torch's global RNG, and Python's `random` for G3DR's target draw), so the same seeds
give the same sample depths. The decoder may be the official `OSGDecoder` instance (its
FullyConnectedLayers are read in place, gradients reach them), `compat.OSGDecoder` (loads an
official state dict: `net.0.weight`, `net.0.bias`, `net.2.weight`, `net.2.bias`) or a `TriplaneDecoder`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import reference, sampling
from ._types import DepthKernel
from ._validate import check_backend
from .functional import sample_triplanes
from .nn import TriplaneDecoder, TriplaneRenderer

RENDERER_KEYS = ("ray_start", "ray_end", "box_warp", "depth_resolution", "depth_resolution_importance",
                 "disparity_space_sampling", "clamp_mode", "white_back", "density_noise")
"""Option keys the official renderers read."""
REQUIRED_KEYS = ("ray_start", "ray_end", "box_warp", "depth_resolution", "depth_resolution_importance")
GENERATOR_KEYS = ("image_resolution", "superresolution_module", "c_gen_conditioning_zero", "gpc_reg_prob", "c_scale",
                  "superresolution_noise_mode", "density_reg", "density_reg_p_dist", "density_reg_every", "reg_type",
                  "decoder_lr_mul", "decoder_output_dim", "sr_antialias", "sr_num_fp16_res", "avg_camera_radius",
                  "avg_camera_pivot", "depth_resolution_default", "depth_resolution_importance_default")
"""Keys EG3D's generator keeps in the same dict (the renderer passes over them, as the official one does)."""
DECODER_KEYS = ("decoder_lr_mul", "decoder_output_dim", "decoder_time_feature", "num_of_layers",
                "add_global_position_as_feature", "fourier_n", "zero_outside_triplanes", "lod")
"""Keys of an EG3D decoder options dict / G3DR's mlp_decoder_config (the last five are unused by its decoder)."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def parse_rendering_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate an EG3D/G3DR rendering_options dict -> TriplaneRenderer keyword arguments
    (n_coarse, n_fine, ray_start, ray_end, box_warp, disparity_space_sampling, white_background,
    density_noise). Unknown keys, missing required keys and unsupported values raise ValueError;
    wrongly typed sample counts raise TypeError."""
    if not isinstance(options, Mapping):
        raise TypeError(f"rendering_options must be a dict, got {type(options).__name__}")
    unknown = sorted(k for k in options if k not in RENDERER_KEYS and k not in GENERATOR_KEYS)
    if unknown:
        raise ValueError(f"rendering_options has unknown key(s) {unknown}; the renderer reads {list(RENDERER_KEYS)} "
                         f"and passes over EG3D's generator keys {list(GENERATOR_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in options]
    if missing:
        raise ValueError(f"rendering_options is missing required key(s) {missing}")
    clamp = options.get("clamp_mode", "softplus")
    if clamp != "softplus":
        raise ValueError(f"rendering_options['clamp_mode'] = {clamp!r} is not supported; only 'softplus' "
                         f"(as EG3D's MipRayMarcher)")
    for k in ("depth_resolution", "depth_resolution_importance"):
        if not _is_int(options[k]):
            raise TypeError(f"rendering_options[{k!r}] must be an int, got {type(options[k]).__name__} {options[k]!r}")
    start, end = options["ray_start"], options["ray_end"]
    if start == "auto" and end == "auto":
        start = end = None
    elif not (_is_number(start) and _is_number(end) and end > start):
        raise ValueError(f"rendering_options ray_start/ray_end must both be 'auto' or numbers with ray_end > "
                         f"ray_start, got {start!r}, {end!r}")
    box_warp = options["box_warp"]
    if not (_is_number(box_warp) and box_warp > 0):
        raise ValueError(f"rendering_options['box_warp'] must be a positive number, got {box_warp!r}")
    noise = options.get("density_noise", 0)
    if not (_is_number(noise) and noise >= 0):
        raise ValueError(f"rendering_options['density_noise'] must be a number >= 0, got {noise!r}")
    for k in ("disparity_space_sampling", "white_back"):
        if not isinstance(options.get(k, False), bool):
            raise TypeError(f"rendering_options[{k!r}] must be a bool, got {options[k]!r}")
    return dict(n_coarse=int(options["depth_resolution"]), n_fine=int(options["depth_resolution_importance"]),
                ray_start=None if start is None else float(start), ray_end=None if end is None else float(end),
                box_warp=float(box_warp), disparity_space_sampling=options.get("disparity_space_sampling", False),
                white_background=options.get("white_back", False), density_noise=float(noise))


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------


class FullyConnectedLayer(nn.Module):
    """EG3D/StyleGAN2's FullyConnectedLayer (linear activation): stored weight [out,in] = randn / lr_multiplier,
    bias [out] = bias_init; used as x @ (weight * lr_multiplier / sqrt(in)).T + bias * lr_multiplier."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, lr_multiplier: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def effective(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(w [out,in], b [out]) as used in the forward pass (zeros when there is no bias)."""
        b = self.weight.new_zeros(self.out_features) if self.bias is None else self.bias * self.bias_gain
        return self.weight * self.weight_gain, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.effective())


class OSGDecoder(nn.Module):
    """EG3D's OSGDecoder (and G3DR's OSGDecoder_extended without the time feature), state-dict
    compatible: `net.0.weight` [hidden, C], `net.0.bias`, `net.2.weight` [1+D, hidden], `net.2.bias`.
    options: {'decoder_lr_mul': float, 'decoder_output_dim': D} (G3DR's mlp_decoder_config works too).
    forward(sampled_features [N, P, M, C], ray_directions) -> {'rgb' [N,M,D], 'sigma' [N,M,1]} (features
    averaged over the P planes first); `effective_params()` feeds the fused renderer."""

    def __init__(self, n_features: int, options: Mapping[str, Any], hidden_dim: int = 64):
        super().__init__()
        if not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict, got {type(options).__name__}")
        unknown = sorted(k for k in options if k not in DECODER_KEYS)
        if unknown:
            raise ValueError(f"decoder options have unknown key(s) {unknown}; known: {list(DECODER_KEYS)}")
        if options.get("decoder_time_feature", False):
            raise ValueError("decoder_time_feature=True is not supported by the fused decoder")
        if "decoder_output_dim" not in options:
            raise ValueError("decoder options need 'decoder_output_dim'")
        out_dim, lr_mul = options["decoder_output_dim"], options.get("decoder_lr_mul", 1)
        if not (_is_int(out_dim) and out_dim >= 1) or not (_is_int(n_features) and n_features >= 1):
            raise ValueError(f"n_features and decoder_output_dim must be ints >= 1, got {n_features!r}, {out_dim!r}")
        if not (_is_number(lr_mul) and lr_mul > 0):
            raise ValueError(f"decoder_lr_mul must be a positive number, got {lr_mul!r}")
        self.hidden_dim, self.lr_multiplier = hidden_dim, float(lr_mul)
        self.net = nn.Sequential(FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=lr_mul), nn.Softplus(),
                                 FullyConnectedLayer(hidden_dim, 1 + out_dim, lr_multiplier=lr_mul))

    def effective_params(self):
        """(w1 [hidden,C], b1 [hidden], w2 [1+D,hidden], b2 [1+D]) as used in the forward pass."""
        return (*self.net[0].effective(), *self.net[2].effective())

    def forward(self, sampled_features: torch.Tensor, ray_directions: torch.Tensor = None) -> Dict[str, torch.Tensor]:
        sigma, rgb = reference.decode(sampled_features.mean(1), *self.effective_params())
        return {"rgb": rgb, "sigma": sigma.unsqueeze(-1)}

    def to_triplane_decoder(self) -> TriplaneDecoder:
        """A TriplaneDecoder with the same stored weights and lr multiplier (so the same outputs)."""
        return load_osg_state_dict(self.state_dict(), lr_multiplier=self.lr_multiplier, prefix="")


def load_osg_state_dict(state_dict: Mapping[str, torch.Tensor], lr_multiplier: float = 1.0,
                        prefix: Optional[str] = None) -> TriplaneDecoder:
    """A TriplaneDecoder from an EG3D/G3DR OSGDecoder state dict (`net.0.weight` [hidden,C], `net.0.bias`,
    `net.2.weight` [1+D,hidden], `net.2.bias`, stored in FullyConnectedLayer's convention; give the
    `decoder_lr_mul` it was trained with). prefix: e.g. 'decoder.' (EG3D generator) or 'eg3d_decoder.'
    (G3DR's U-Net); found automatically when exactly one '*net.0.weight' key exists."""
    if prefix is None:
        hits = [k[: -len("net.0.weight")] for k in state_dict if k.endswith("net.0.weight")]
        if len(hits) != 1:
            raise ValueError(f"cannot find one decoder in the state dict (keys ending in 'net.0.weight': "
                             f"{[h + 'net.0.weight' for h in hits]}); pass prefix=")
        prefix = hits[0]
    names = [prefix + n for n in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")]
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise ValueError(f"state dict lacks decoder key(s) {missing}")
    w1, b1, w2, b2 = (state_dict[n] for n in names)
    if (w1.dim() != 2 or w2.dim() != 2 or b1.shape != w1.shape[:1] or w2.shape[1] != w1.shape[0]
            or b2.shape != w2.shape[:1]):
        raise ValueError(f"decoder tensors have inconsistent shapes: net.0.weight {list(w1.shape)}, net.0.bias "
                         f"{list(b1.shape)}, net.2.weight {list(w2.shape)}, net.2.bias {list(b2.shape)}")
    dec = TriplaneDecoder(w1.shape[1], w1.shape[0], w2.shape[0] - 1, lr_multiplier=lr_multiplier)
    dec = dec.to(w1.device, w1.dtype)
    with torch.no_grad():
        for p, v in zip((dec.weight1, dec.bias1, dec.weight2, dec.bias2), (w1, b1, w2, b2)):
            p.copy_(v)
    return dec


class _OfficialDecoderView:
    """effective_params() read from an official OSGDecoder instance (net = [FC, Softplus, FC] with
    weight, bias, weight_gain, bias_gain), so gradients reach its parameters."""

    def __init__(self, decoder):
        self.decoder = decoder

    def effective_params(self):
        out = []
        for layer in (self.decoder.net[0], self.decoder.net[2]):
            w = layer.weight * layer.weight_gain
            b = layer.weight.new_zeros(w.shape[0]) if layer.bias is None else layer.bias * layer.bias_gain
            out += [w, b]
        return tuple(out)


def fused_decoder(decoder):
    """The object the fused renderer reads weights from: decoder itself when it has effective_params(),
    else a view of an official OSGDecoder; anything else raises TypeError."""
    if callable(getattr(decoder, "effective_params", None)):
        return decoder
    net = getattr(decoder, "net", None)
    ok = (isinstance(net, nn.Sequential) and len(net) == 3 and isinstance(net[1], nn.Softplus)
          and all(hasattr(net[i], a) for i in (0, 2) for a in ("weight", "bias", "weight_gain", "bias_gain")))
    if not ok:
        raise TypeError(f"decoder {type(decoder).__name__} is not an OSGDecoder (net = FullyConnectedLayer, Softplus, "
                        f"FullyConnectedLayer), a compat.OSGDecoder or a TriplaneDecoder; the fused renderer "
                        f"needs one of those")
    if getattr(decoder, "decoder_time_feature", False):
        raise ValueError("decoder_time_feature=True is not supported by the fused renderer")
    return _OfficialDecoderView(decoder)


# ---------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------


class EG3DImportanceRenderer(nn.Module):
    """EG3D's ImportanceRenderer on the fused kernels (one plane level, EG3D's plane axes).

    forward(planes [B,3,C,H,W], decoder, ray_origins [B,R,3], ray_directions [B,R,3], rendering_options)
    -> (rgb [B,R,D] in [-1,1], depth [B,R,1], weight_total [B,R,1]). Sampling is
    `TriplaneRenderer(sampling="eg3d")`; depth is EG3D's sum(w t) / sum(w), NaN -> +inf, clamped to
    [min, max] of all sample depths of the batch. backend: as every g3dr_kernels op."""

    levels = 1

    def __init__(self, backend: str = "auto"):
        super().__init__()
        check_backend(backend)
        self.backend = backend

    def renderer(self, decoder, rendering_options: Mapping[str, Any], **kwargs) -> TriplaneRenderer:
        """The TriplaneRenderer equivalent to this renderer with these options and decoder."""
        opts = parse_rendering_options(rendering_options)
        return TriplaneRenderer(fused_decoder(decoder), sampling="eg3d", levels=self.levels, plane_axes="eg3d",
                                backend=self.backend, **opts, **kwargs)

    def _finish(self, out, depths) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # sum(w t) from depth = sum(w t) / (opacity + eps); then EG3D's division without eps
        num = out.depth * (out.opacity + 1e-3)
        pos = out.opacity > 0
        depth = torch.where(pos, num / torch.where(pos, out.opacity, torch.ones_like(out.opacity)),
                            torch.full_like(num, math.inf))
        depth = torch.clamp(depth, depths.min(), depths.max())
        return out.rgb * 2 - 1, depth.unsqueeze(-1), out.opacity.unsqueeze(-1)

    def forward(self, planes, decoder, ray_origins, ray_directions, rendering_options):
        r = self.renderer(decoder, rendering_options, eps=1e-3)
        depths, noise = r.render_depths(planes, ray_origins, ray_directions)
        return self._finish(r.render_at(planes, ray_origins, ray_directions, depths, noise=noise), depths)

    def run_model(self, planes, decoder, sample_coordinates, sample_directions, options):
        """EG3D's run_model: points [B,M,3] -> decoder(features [B,1,M,C], directions) dict, with
        density noise added to 'sigma' when options['density_noise'] > 0 (used by EG3D's density
        regularisation)."""
        opts = parse_rendering_options(options)
        feats = sample_triplanes(planes, sample_coordinates, levels=self.levels, box_warp=opts["box_warp"],
                                 plane_axes="eg3d", backend=self.backend)
        out = decoder(feats.unsqueeze(1), sample_directions)
        if opts["density_noise"] > 0:
            out["sigma"] = out["sigma"] + torch.randn_like(out["sigma"]) * opts["density_noise"]
        return out

    def sample_stratified(self, ray_origins, ray_start, ray_end, depth_resolution, disparity_space_sampling=False):
        """EG3D's sample_stratified: ray_start/ray_end numbers or [B,R,1] -> depths [B,R,S,1]."""
        B, R = ray_origins.shape[:2]
        num = not isinstance(ray_start, torch.Tensor)
        dt = torch.get_default_dtype() if num else ray_start.dtype
        near = torch.full((B, R), ray_start, dtype=dt, device=ray_origins.device) if num else ray_start.reshape(B, R)
        far = torch.full((B, R), ray_end, dtype=dt, device=ray_origins.device) if num else ray_end.reshape(B, R)
        return sampling.eg3d_stratified_depths(near, far, depth_resolution,
                                                disparity=disparity_space_sampling).unsqueeze(-1)

    def sample_importance(self, z_vals, weights, N_importance):
        """EG3D's sample_importance: z_vals [B,R,S,1], weights [B,R,S-1,1] -> [B,R,N,1]."""
        return sampling.eg3d_importance_depths(z_vals[..., 0], weights[..., 0], N_importance).unsqueeze(-1)


class G3DRImportanceRenderer(EG3DImportanceRenderer):
    """G3DR's extended ImportanceRenderer (train.py, STYLE 'lod_no') on the fused kernels: three plane
    levels (finest, 1/2, 1/4) summed, and with importance_depth [B,1,H,W] (H*W = R, row-major like the
    rays) the G3DR target mixture (with probability target_prob = 0.4, drawn by Python's
    `random() > 0.6`, the fine samples are target + linspace(-0.05, 0.05, n_fine)) and the depth-kernel
    gradient scaling 1.25 exp(-(x - t)^2 / 0.03) clamped to [0.05, 1].

    forward(...) -> (rgb [B,R,D] in [-1,1], depth [B,R,1] = sum(w t) / (sum(w) + 1e-3),
    weight_total [B,R,1], depths_mid [B,R,S-1,1])."""

    levels = 3

    def __init__(self, backend: str = "auto", target_prob: float = 0.4, target_spread: float = 0.05,
                 kernel: DepthKernel = DepthKernel()):
        super().__init__(backend)
        self.target_prob, self.target_spread, self.kernel = target_prob, target_spread, kernel

    def forward(self, planes, decoder, ray_origins, ray_directions, rendering_options, importance_depth=None):
        r = self.renderer(decoder, rendering_options, eps=1e-3, target_mode="replace" if
                          parse_rendering_options(rendering_options)["n_fine"] > 0 else "add",
                          target_prob=self.target_prob, target_spread=self.target_spread, kernel=self.kernel)
        target = None
        if importance_depth is not None:
            rays_ok = isinstance(ray_origins, torch.Tensor) and ray_origins.dim() == 3
            B, R = ray_origins.shape[:2] if rays_ok else (-1, -1)
            img = importance_depth
            if (not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[0] != B or img.shape[1] != 1
                    or img.shape[2] * img.shape[3] != R):
                got = list(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"importance_depth must be an image [B,1,H,W] with H*W = R for rays [B,R,3] = "
                                 f"{list(getattr(ray_origins, 'shape', []))}, got {got}")
            target = importance_depth.permute(0, 2, 3, 1).reshape(B, R).to(ray_origins.dtype)
        depths, noise = r.render_depths(planes, ray_origins, ray_directions, target)
        out = r.render_at(planes, ray_origins, ray_directions, depths, target_depth=target, noise=noise)
        depths_mid = 0.5 * (depths[..., :-1] + depths[..., 1:])
        return out.rgb * 2 - 1, out.depth.unsqueeze(-1), out.opacity.unsqueeze(-1), depths_mid.unsqueeze(-1)
