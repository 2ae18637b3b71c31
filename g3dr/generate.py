"""Text / ImageNet class -> RGB-D with LDM3D (the paper's f_rgbd step), in G3DR's depth convention.

diffusers' `StableDiffusionLDM3DPipeline` is loaded from a LOCAL directory (nothing is downloaded):

    huggingface-cli download Intel/ldm3d-4c --local-dir DIR      # on a machine with network

What LDM3D's depth is. The LDM3D models were fine-tuned on RGB + depth pairs whose depth came from
DPT-Large (MiDaS) (LDM3D paper, arXiv 2305.10853; the Intel/ldm3d-pano model card, which fine-tunes
ldm3d-4c, says "to generate the depth map of those samples, we used DPT-large"), and DPT/MiDaS
outputs relative INVERSE depth (disparity): larger = nearer, known only up to scale and shift
(Ranftl et al., MiDaS / DPT). Not checked against the real weights here (they cannot be downloaded
on the development machines): the first run with Intel/ldm3d-4c should confirm that near objects
come out with small G3DR depth. The 4-channel VAE of `Intel/ldm3d-4c` decodes RGB + that one depth channel in
[-1, 1]; the pipeline's image processor maps it to [0, 1] (and to uint16 * 65535 for its PIL
output). So `generate_rgbd` takes the [0, 1] depth channel as kind="inverse" and converts it with
`g3dr.depth.to_g3dr_depth` (percentile-normalised, flipped: depth in [4, 6), larger = farther).
Pass `depth_kind="depth"` if a checkpoint stores depth the other way round.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

from .depth import KINDS, to_g3dr_depth
from .depthio import write_depth_png
from .devices import pick_device
from .files import write_png

DEFAULT_LDM3D_MODEL = "Intel/ldm3d-4c"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class LDM3DNotFoundError(FileNotFoundError):
    """The local LDM3D directory is missing or incomplete."""


def _ldm3d_missing_message(model_dir: Path, missing) -> str:
    state = "missing" if not model_dir.is_dir() else "incomplete"
    return (f"LDM3D directory {model_dir} is {state}{' (missing: ' + ', '.join(missing) + ')' if missing else ''}. "
            f"It must hold a diffusers StableDiffusionLDM3DPipeline saved with save_pretrained: model_index.json and "
            f"one subfolder per component (unet, vae, scheduler, text_encoder, tokenizer). Weights are never "
            f"downloaded here; on a machine with network run `huggingface-cli download {DEFAULT_LDM3D_MODEL} "
            f"--local-dir {model_dir}` and copy the folder over.")


def check_ldm3d_dir(model_dir: Union[str, Path]) -> Tuple[Path, dict]:
    """Raise `LDM3DNotFoundError` unless model_dir has model_index.json and every component folder it names.

    Returns (model_dir, the parsed model_index.json)."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise LDM3DNotFoundError(_ldm3d_missing_message(model_dir, []))
    index = model_dir / "model_index.json"
    if not index.is_file():
        raise LDM3DNotFoundError(_ldm3d_missing_message(model_dir, ["model_index.json"]))
    try:
        spec = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise LDM3DNotFoundError(f"cannot read {index}: {e}\n" + _ldm3d_missing_message(model_dir, [])) from e
    # components are `"name": ["library", "ClassName"]`; null entries (e.g. no safety checker) need no folder
    missing = [f"{name}/" for name, v in spec.items()
               if not name.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None
               and not (model_dir / name).is_dir()]
    if missing:
        raise LDM3DNotFoundError(_ldm3d_missing_message(model_dir, missing))
    return model_dir, spec


def load_ldm3d(model_dir: Union[str, Path], device: Union[str, torch.device, None] = None,
               dtype: Optional[torch.dtype] = None, progress: bool = True):
    """A diffusers `StableDiffusionLDM3DPipeline` from a LOCAL directory (`local_files_only=True`).

    device: default cuda when available, else cpu. dtype: default float16 on cuda, float32 on cpu.
    Raises `LDM3DNotFoundError` naming the directory and the model to put there (Intel/ldm3d-4c).
    """
    model_dir, spec = check_ldm3d_dir(model_dir)
    try:
        from diffusers import StableDiffusionLDM3DPipeline  # optional: g3dr[generate]
    except ImportError as e:
        raise ImportError("g3dr generate needs diffusers and transformers: pip install 'g3dr[generate]'") from e
    device = pick_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        # components saved as null (no safety checker, ...) or absent from an older index must be passed as None
        absent = {name: None for name, v in spec.items() if isinstance(v, list) and v and v[0] is None}
        absent.update({name: None for name in StableDiffusionLDM3DPipeline._optional_components if name not in spec})
        # loaded as stored, then cast: `torch_dtype=` is deprecated in new diffusers, `dtype=` unknown to old ones
        pipe = StableDiffusionLDM3DPipeline.from_pretrained(model_dir, local_files_only=True, **absent)
    except (OSError, ValueError, EnvironmentError) as e:
        raise LDM3DNotFoundError(f"cannot load LDM3D from {model_dir}: {e}\n"
                                 + _ldm3d_missing_message(model_dir, [])) from e
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def imagenet_class_name(class_id: int) -> str:
    """ImageNet-1k class index (0..999) -> its name, from torchvision's weight metadata (no download)."""
    if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer)):
        raise TypeError(f"imagenet class id must be an int, got {type(class_id).__name__}")
    if not 0 <= int(class_id) < 1000:
        raise ValueError(f"imagenet class id must be in [0, 999], got {class_id}")
    try:
        from torchvision.models import ResNet50_Weights  # optional: only g3dr[train] installs it
    except ImportError as e:
        raise ImportError("ImageNet class names come from torchvision: pip install torchvision") from e
    return ResNet50_Weights.IMAGENET1K_V1.meta["categories"][int(class_id)]


def imagenet_class_prompt(class_id: int, template: str = "a photo of a {}") -> str:
    """ImageNet-1k class index -> a text prompt, e.g. 207 -> "a photo of a golden retriever"."""
    return template.format(imagenet_class_name(class_id))


def generate_rgbd(pipe, prompt: Optional[str] = None, *, prompt_embeds: Optional[torch.Tensor] = None,
                  negative_prompt_embeds: Optional[torch.Tensor] = None, class_id: Optional[int] = None,
                  height: Optional[int] = None, width: Optional[int] = None, steps: int = 50,
                  guidance: float = 5.0, seed: Optional[int] = None, depth_kind: str = "inverse",
                  lo_pct: float = 1.0, hi_pct: float = 99.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One RGB-D sample from an LDM3D pipeline.

    Conditioning: exactly one of `prompt` (text), `class_id` (ImageNet index -> `imagenet_class_prompt`)
    or `prompt_embeds` ([1, T, E] text-encoder states; no tokenizer needed). With guidance > 1 and
    prompt_embeds, give `negative_prompt_embeds` too unless the pipeline has a tokenizer.
    height/width: pixels, multiples of the VAE factor (default: the pipeline's, 512 for ldm3d-4c).
    steps: denoising steps; guidance: classifier-free guidance scale; seed: for a reproducible sample.
    Returns (rgb [3, H, W] float32 in [0, 1], depth [H, W] float32 in G3DR's convention, [4, 6),
    larger = farther), both on the CPU. LDM3D's depth is taken as `depth_kind` (default "inverse";
    see the module docstring) and converted by `to_g3dr_depth(.., lo_pct, hi_pct)`.
    """
    given = [n for n, v in (("prompt", prompt), ("class_id", class_id), ("prompt_embeds", prompt_embeds))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"generate_rgbd: give exactly one of prompt, class_id, prompt_embeds; got {given or 'none'}")
    if depth_kind not in KINDS:
        raise ValueError(f"generate_rgbd: depth_kind must be one of {KINDS}, got {depth_kind!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generate_rgbd: steps must be an int >= 1, got {steps!r}")
    vae_out = getattr(getattr(pipe, "vae", None), "config", None)
    if vae_out is not None and getattr(vae_out, "out_channels", 4) != 4:
        raise ValueError(f"generate_rgbd: the pipeline's VAE decodes {vae_out.out_channels} channels; only the "
                         f"4-channel RGB + depth layout of {DEFAULT_LDM3D_MODEL} is supported")
    if class_id is not None:
        prompt = imagenet_class_prompt(class_id)
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"generate_rgbd: prompt must be a str, got {type(prompt).__name__}")
    if prompt_embeds is not None:
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"generate_rgbd: prompt_embeds must be [1, T, E], got {tuple(prompt_embeds.shape)}")
        if (guidance > 1 and negative_prompt_embeds is None
                and (getattr(pipe, "tokenizer", None) is None or getattr(pipe, "text_encoder", None) is None)):
            raise ValueError("generate_rgbd: guidance > 1 with prompt_embeds needs negative_prompt_embeds when the "
                             "pipeline has no tokenizer/text encoder (or use guidance <= 1)")
    for name, v in (("height", height), ("width", width)):
        f = getattr(pipe, "vae_scale_factor", 8)
        if v is not None and (not isinstance(v, int) or v < f or v % f):
            raise ValueError(f"generate_rgbd: {name} must be a positive multiple of {f} (the VAE factor), got {v!r}")
    generator = torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None
    out = pipe(prompt=prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
               height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
               generator=generator, output_type="np")
    rgb = np.asarray(out.rgb)[0]                 # [H, W, 3] float in [0, 1]
    ldm_depth = np.asarray(out.depth)[0]         # [H, W, 1] float in [0, 1], larger = nearer (inverse)
    if ldm_depth.ndim == 3:
        ldm_depth = ldm_depth[..., 0]
    rgb_t = torch.from_numpy(np.ascontiguousarray(rgb)).float().permute(2, 0, 1).clamp(0, 1).contiguous()
    depth = to_g3dr_depth(torch.from_numpy(np.ascontiguousarray(ldm_depth)).float(), depth_kind, lo_pct, hi_pct)
    return rgb_t, depth


def save_rgbd(out_dir: Union[str, Path], name: str, rgb: torch.Tensor, depth: torch.Tensor) -> Tuple[Path, Path]:
    """Write `out_dir/name.png` (8-bit RGB) and `out_dir/name_depth.png` (16-bit, G3DR convention).

    rgb: [3, H, W] float in [0, 1]; depth: [H, W] in G3DR units ([4, 6)). Both writes are atomic
    (temp file, then rename). The result is a training folder for `g3dr train`. Returns both paths.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith("_depth"):
        raise ValueError(f"save_rgbd: name must be a plain file stem (letters, digits, . _ -; not ending in "
                         f"'_depth'), got {name!r}")
    if not isinstance(rgb, torch.Tensor) or not isinstance(depth, torch.Tensor):
        raise TypeError(f"save_rgbd: rgb and depth must be tensors, got {type(rgb).__name__}, {type(depth).__name__}")
    if rgb.dim() != 3 or rgb.shape[0] != 3:
        raise ValueError(f"save_rgbd: rgb must be [3, H, W], got {tuple(rgb.shape)}")
    if depth.dim() != 2 or tuple(depth.shape) != tuple(rgb.shape[1:]):
        raise ValueError(f"save_rgbd: depth must be [H, W] = {tuple(rgb.shape[1:])}, got {tuple(depth.shape)}")
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"save_rgbd: cannot create output folder {out_dir}: {e}") from e
    rgb_path, depth_path = out_dir / f"{name}.png", out_dir / f"{name}_depth.png"
    arr = (rgb.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    write_png(rgb_path, arr)
    write_depth_png(depth_path, depth)
    return rgb_path, depth_path
