"""A reconstruction as one self-contained HTML file: the triplane pyramid (float16) and the decoder's
effective weights (float32) embedded, ray-marched by a WebGL2 fragment shader (g3dr/assets/viewer.html)
with the math of `G3DR.render`: the renderer's "uniform" sampling in eval mode (n_coarse bin-centre
samples between the box bounds, n_fine inverse-CDF samples at u = linspace(0, 1, n_fine) from the
smoothed coarse weights, merged), three-level antialiased pyramid, bilinear align_corners=False with
zeros outside, the decoder MLP, MipRayMarcher compositing. No network, no server: open it in a browser.

    model = g3dr.load("runs/x"); planes = model.reconstruct(image, depth)
    info = export_html(model, planes, "scene.html")   # {"path", "bytes", "psnr_fp16", "max_abs_rgb", ...}

Precision: the planes are stored as float16 (11-bit significand: relative rounding error <= 2^-11)
after the pyramid is computed in float32; `export_html` measures what that costs by rendering three
views with the float16 and the float32 pyramid (PSNR and max colour error, written into the file).
URL fragment: #yaw=1.57&pitch=1.57&size=256 (radians, canvas pixels); optional radius, mode
(rgb|depth|opacity), sigma (the density scale of `G3DR.render`), nc / nf (sample counts).
"""
from __future__ import annotations

import base64
import json
import math
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from g3dr_kernels import PLANE_AXES, reference
from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays

from .cameras import CANONICAL_PITCH, CANONICAL_YAW
from .export import check_out
from .files import write_bytes

HTML_FORMATS = (".html", ".htm")
FORMAT = "g3dr-webgl-1"
# views (yaw, pitch offsets from the canonical camera, radians) on which the float16 error is measured
_CHECK_VIEWS = ((0.0, 0.0), (0.35, -0.15), (-0.5, 0.2))


def _pyramid(planes) -> List[torch.Tensor]:
    """One scene's planes [1,3,C,H,W] (or a finest-first list of [1,3,C,h,w]) -> float32 levels [3,C,h,w]."""
    if isinstance(planes, torch.Tensor):
        planes = [planes]
    levels = [p.detach().float().cpu() for p in planes]
    if not levels or any(p.dim() != 5 or p.shape[:2] != (1, 3) for p in levels):
        raise ValueError(f"planes must be one scene, [1,3,C,H,W] or a list of such levels, got "
                         f"{[list(p.shape) for p in levels]}")
    if len({p.shape[2] for p in levels}) != 1:
        raise ValueError(f"pyramid levels differ in channels: {[list(p.shape) for p in levels]}")
    return [p[0] for p in levels]


def renderer_settings(model, n_coarse: Optional[int] = None, n_fine: Optional[int] = None) -> Dict:
    """What the shader needs from the model's still renderer (`G3DR.render`'s), checked to be what the
    shader implements: box bounds, 'uniform' sampling, no density noise, no disparity sampling."""
    r = model.make_renderer(n_coarse, n_fine, sampling="uniform").eval()
    unsupported = {"ray_start": r.ray_start is not None, "disparity_space_sampling": r.disparity_space_sampling,
                   "density_noise": r.density_noise > 0}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"the HTML viewer renders with box bounds and no noise; this model's renderer sets {bad}")
    if r.plane_axes not in PLANE_AXES:
        raise ValueError(f"unknown plane_axes {r.plane_axes!r}")
    cfg = model.cfg.render
    return {"n_coarse": r.n_coarse, "n_fine": r.n_fine, "levels": r.levels, "box_warp": float(r.box_warp),
            "plane_axes": PLANE_AXES[r.plane_axes], "density_bias": float(r.density_bias), "eps": float(r.eps),
            "white_background": bool(r.white_background), "radius": float(cfg.radius), "fov": float(cfg.fov)}


def _decoder_block(model) -> Dict:
    """The decoder's effective weights (nn.Linear layout) in the shader's std140 block:
    vec4 W1[hidden * C4] (row j, channels 4g..4g+3), vec4 W2[hidden] (column j: sigma, r, g, b),
    vec4 B1[ceil(hidden / 4)], vec4 B2."""
    w1, b1, w2, b2 = (p.detach().float().cpu() for p in model.decoder.effective_params())
    hidden, C = w1.shape
    if w2.shape != (4, hidden) or b1.shape != (hidden,) or b2.shape != (4,):
        raise ValueError(f"the HTML viewer needs a decoder C -> hidden -> 1 + 3 (sigma, rgb); got w1 "
                         f"{list(w1.shape)}, w2 {list(w2.shape)}")
    c4, h4 = -(-C // 4), -(-hidden // 4)
    W1 = torch.zeros(hidden, c4 * 4)
    W1[:, :C] = w1
    B1 = torch.zeros(h4 * 4)
    B1[:hidden] = b1
    block = torch.cat([W1.reshape(-1), w2.t().reshape(-1), B1, b2]).numpy().astype("<f4")
    return {"hidden": hidden, "channels": C, "data": base64.b64encode(block.tobytes()).decode("ascii")}


def _plane_block(levels: Sequence[torch.Tensor]) -> Dict:
    """Levels [3,C,h,w] -> float16 texels, per level [3, C4, h, w, 4] (channels padded to 4s)."""
    C = levels[0].shape[1]
    c4 = -(-C // 4)
    chunks = []
    for lv in levels:
        _, _, h, w = lv.shape
        pad = torch.zeros(3, c4 * 4, h, w)
        pad[:, :C] = lv
        chunks.append(pad.reshape(3, c4, 4, h, w).permute(0, 1, 3, 4, 2).numpy().astype("<f2").reshape(-1))
    data = np.concatenate(chunks)
    if not np.isfinite(data).all():
        big = max(float(lv.abs().max()) for lv in levels)
        raise ValueError(f"planes do not fit float16 (largest |value| {big:.4g}, float16 max 65504) or are not finite")
    return {"dtype": "float16", "channels": C, "c4": c4, "levels": [[lv.shape[3], lv.shape[2]] for lv in levels],
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


@torch.no_grad()
def _render_pyramid(model, pyramid: Sequence[torch.Tensor], yaw: float, pitch: float, resolution: int,
                    n_coarse: int, n_fine: int) -> torch.Tensor:
    """rgb [R*R, 3] of one view rendered by the model's still renderer from a given pyramid (levels [3,C,h,w])."""
    dev = next(model.parameters()).device
    r = model.make_renderer(n_coarse, n_fine, sampling="uniform").eval()
    o, d = g3dr_rays(g3dr_cam2world(yaw, pitch, model.cfg.render.radius, device=dev), model.cfg.render.fov, resolution)
    pyr = [lv[None].to(dev) for lv in pyramid]
    return torch.cat([r(pyr, o[:, a:a + 16384], d[:, a:a + 16384]).rgb[0]
                      for a in range(0, resolution * resolution, 16384)]).cpu()


def float16_error(model, levels: Sequence[torch.Tensor], n_coarse: int, n_fine: int, resolution: int = 64) -> Dict:
    """What storing the pyramid as float16 costs: the largest plane rounding error, and the colour of
    three views (canonical and two off-axis) rendered from the float16 vs the float32 pyramid: the
    worst PSNR (dB, colours in [0,1]) and max abs difference over them."""
    half = [lv.half().float() for lv in levels]
    max_plane = max(float((a - b).abs().max()) for a, b in zip(half, levels))
    mse, worst = [], 0.0
    for dy, dp in _CHECK_VIEWS:
        ref = _render_pyramid(model, levels, CANONICAL_YAW + dy, CANONICAL_PITCH + dp, resolution, n_coarse, n_fine)
        got = _render_pyramid(model, half, CANONICAL_YAW + dy, CANONICAL_PITCH + dp, resolution, n_coarse, n_fine)
        mse.append(float(((got - ref) ** 2).mean()))
        worst = max(worst, float((got - ref).abs().max()))
    psnr = min(10 * math.log10(1 / m) if m > 0 else math.inf for m in mse)
    return {"max_abs_plane": max_plane, "psnr_fp16": psnr, "max_abs_rgb": worst}


def html_text(payload: Dict) -> str:
    """The viewer page with `payload` (see `scene_payload`) embedded as JSON."""
    template = resources.files("g3dr").joinpath("assets/viewer.html").read_text(encoding="utf-8")
    # '<' escaped so no string in the JSON can close the <script> element
    blob = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
    title = str(payload.get("title") or "g3dr scene").replace("&", "&amp;").replace("<", "&lt;")
    return template.replace("/*G3DR_TITLE*/", title).replace("/*G3DR_SCENE*/", blob)


def scene_payload(model, planes, *, n_coarse: Optional[int] = None, n_fine: Optional[int] = None,
                  yaw: float = CANONICAL_YAW, pitch: float = CANONICAL_PITCH, title: str = "g3dr scene",
                  measure: bool = True) -> Dict:
    """Everything the page needs: planes pyramid (float16), decoder block, renderer settings, the initial
    camera; with measure, the float16 error (`float16_error`) too. planes: one scene [1,3,C,H,W] as
    `model.reconstruct` returns it (the pyramid is built as the renderer builds it), or a finest-first
    list of levels. n_coarse / n_fine default to the model's config."""
    settings = renderer_settings(model, n_coarse, n_fine)
    levels = _pyramid(planes)
    if len(levels) == 1:
        levels = [lv[0] for lv in reference.build_pyramid(levels[0][None], settings["levels"])]
    elif len(levels) != settings["levels"]:
        raise ValueError(f"a pyramid of {len(levels)} levels, but the renderer uses {settings['levels']}")
    dec = _decoder_block(model)
    if dec["channels"] != levels[0].shape[1]:
        raise ValueError(f"planes have {levels[0].shape[1]} channels, the decoder takes {dec['channels']}")
    payload = {"format": FORMAT, "title": title, "render": settings,
               "camera": {"yaw": float(yaw), "pitch": float(pitch)}, "planes": _plane_block(levels), "decoder": dec}
    if measure:
        err = float16_error(model, levels, settings["n_coarse"], settings["n_fine"])
        payload["float16"] = err
        payload["note"] = (f"planes stored as float16: {err['psnr_fp16']:.1f} dB PSNR vs float32 "
                           f"(max colour error {err['max_abs_rgb']:.2g})")
    return payload


def export_html(model, planes, path: Union[str, Path], **kw) -> Dict:
    """Write the viewer page for one scene atomically (see `scene_payload` for the options) ->
    {"path", "bytes", and the float16 error numbers when measured}."""
    path = check_out(path, HTML_FORMATS, "viewer")
    payload = scene_payload(model, planes, **kw)
    text = html_text(payload)
    write_bytes(path, text)
    return {"path": str(path), "bytes": len(text.encode()), **payload.get("float16", {})}
