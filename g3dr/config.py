"""G3DR configuration: one dataclass tree, named presets, YAML load/save and `a.b=c` overrides.

Presets (`PRESETS`):
  official  the official code's values (preddy5/G3DR train.py + config/imagenet_train.yaml)
  paper     the paper's values (CVPR 2024, Sec. 4 and the supplement)
  small     trains in minutes on 2 CPU cores: 64x64, a narrow U-Net, C=32, 24+24 samples
  fast      `small` set up to learn visible 3D within an hour on 2 CPU cores (the shipped model's preset)
  fast-carve  a short carving fine-tune (60 steps, `--init`) for models trained without `fast`'s carving
  tiny      for tests: 16x16, a minimal U-Net, C=8, 8+8 samples

Schedule quantities that depend on the run length are fractions of `train.steps`, so a preset
keeps its shape when the step count is overridden (the official code ties them to T as well).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

from g3dr_kernels import DepthKernel
from g3dr_kernels.nn import SAMPLINGS, TARGET_MODES, RendererOptions


@dataclass
class ModelConfig:
    """f_trigen (RGB-D U-Net -> triplanes) and the triplane decoder."""
    image_size: int = 128               # input and plane resolution (planes are image_size^2)
    in_channels: int = 4                # RGB in [-1,1] + raw depth
    pos_channels: int = 256             # learned positional embedding concatenated to the input
    base_width: int = 128               # U-Net width at the first level
    width_mults: Tuple[int, ...] = (1, 2, 4, 8)
    groups: int = 8                     # GroupNorm groups
    attn_heads: int = 4
    attn_dim_head: int = 32
    plane_channels: int = 64            # C: channels per plane (output 3*C)
    decoder_hidden: int = 64
    decoder_lr_mul: float = 1.0
    plane_layout: str = "native"        # "native": U-Net output is the planes (official); "image": each plane's
                                        # grid turned so its axes line up with the input image's; "lift": each
                                        # pixel's features splatted at its 3D point (depth) in every plane
                                        # (g3dr/model.py: PlaneLift)


@dataclass
class RenderConfig(RendererOptions):
    """Camera, the depth kernel, and the triplane renderer's options. The renderer's options are
    `g3dr_kernels.nn.RendererOptions` (every field, default and check there); this class adds the
    camera and the kernel, and sets G3DR's own defaults where they differ from the library's."""
    fov: float = 18.0                   # degrees, over the outermost pixel centres
    radius: float = 5.0                 # canonical camera distance
    # G3DR's values for options of the renderer (the library's defaults are its own choices)
    n_coarse: int = 32
    n_fine: int = 32
    sampling: str = "eg3d"              # "eg3d" (official sample placement) | "uniform"
    target_mode: str = "replace"        # target samples replace the fine ones ("replace", official) or are added
    n_target: int = 32                  # samples around the target depth in "add" mode (unused by "replace")
    target_prob: float = 0.4            # probability of taking the target samples in a canonical step
    depth_kernel: bool = True           # G3DR's depth-kernel gradient scaling on canonical views
    kernel_start: float = 0.0           # fraction of the steps before which the kernel scales no gradient
    kernel_s1: float = DepthKernel.s1   # the kernel's parameters (g3dr_kernels.DepthKernel)
    kernel_s2: float = DepthKernel.s2
    kernel_c_min: float = DepthKernel.c_min
    kernel_c_max: float = DepthKernel.c_max

    def renderer_options(self, **overrides) -> RendererOptions:
        """The validated renderer options of this config (single fields overridable). In "replace" mode the
        fine samples become the target samples, so the renderer gets n_target = 0."""
        if self.target_mode == "replace" and "n_target" not in overrides:
            overrides["n_target"] = 0
        return RendererOptions.build(self, prefix="render.", **overrides)

    def kernel(self) -> DepthKernel:
        return DepthKernel(self.kernel_s1, self.kernel_s2, self.kernel_c_min, self.kernel_c_max)


@dataclass
class LossConfig:
    """Loss terms and weights. Canonical branch: recon, depth, LPIPS (canon layers), CLIP (canon);
    novel branch: CLIP (novel), LPIPS (novel layers), TV on depth, carving. Both: the opacity term."""
    recon: str = "l1"                   # "l1" (official, on [-1,1]) | "mse" (paper)
    w_recon: float = 1.0
    depth: str = "l1"                   # "l1" | "smooth_l1"
    w_depth: float = 2.0
    w_lpips_canon: float = 1.0
    lpips_canon_layers: Tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    canon_perceptual_start: float = 0.5  # fraction of steps before which canonical LPIPS/CLIP are off
    w_clip_canon: float = 0.175
    w_lpips_novel: float = 2.0
    lpips_novel_layers: Tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, 1.0)
    w_clip_novel: float = 0.35
    clip_novel_start_weight: float = 0.35  # novel CLIP weight at step 0, ramped linearly to w_clip_novel ...
    clip_novel_ramp: float = 0.0        # ... over this fraction of the steps (0 = constant)
    w_tv: float = 0.1
    w_opacity: float = 1.0
    w_free: float = 0.0                 # free space (canonical): opacity accumulated in front of target - free_margin
    free_margin: float = 0.05           # depth units (the free-space and carving terms)
    w_carve: float = 0.0                # novel views: opacity at samples the input view shows empty (in front of
                                        # its depth map, extended beyond the frame by its edges, by free_margin)
    novel_opacity: str = "all"          # novel views' opacity term on "all" rays (official) or only on rays that
                                        # end "behind" the input view's surface (they must cross it)
    opacity_ramp: float = 0.5           # opacity weight rises 0 -> w_opacity over this fraction of the steps
    clip_loss: str = "l1"               # "l1" between embeddings (official) | "cosine"
    clip_model: str = "ViT-B-16"        # open_clip model name
    clip_weights: str = ""              # local open_clip checkpoint file ("" = look in the caches)
    vgg_weights: str = ""               # local torchvision vgg16 ImageNet checkpoint ("" = torch hub cache)
    allow_random_init: bool = False     # random CLIP/VGG when no weights are found (tests, CPU demo)


@dataclass
class ScheduleConfig:
    """Pure functions of the step (g3dr/schedules.py)."""
    p_novel_max: float = 0.4            # tau: the probability of a novel-view step ...
    p_novel_ramp: float = 0.2           # ... reached after this fraction of the steps (official: min(0.4, 2 s / T))
    view_sampler: str = "uniform"       # "uniform" (official) | "gaussian" (paper)
    yaw_range_start: float = math.pi / 24
    yaw_range_end: float = math.pi / 6
    yaw_range_ramp: float = 1 / 3       # fraction of the steps over which the yaw range widens
    pitch_range: float = math.pi / 18
    yaw_std: float = 0.3                # gaussian sampler: yaw ~ N(pi/2, yaw_std)
    pitch_std: float = 0.15             # gaussian sampler: pitch ~ pi/2 + N(0, pitch_std)
    lr: float = 5e-5                    # peak learning rate
    lr_schedule: str = "onecycle"       # "onecycle" (official) | "warmup_cosine" (paper) | "constant"
    warmup: float = 0.02                # fraction of the steps (onecycle pct_start / linear warm-up)
    lr_start: float = 2e-6              # warmup_cosine: learning rate at step 0
    lr_end: float = 0.0                 # warmup_cosine: learning rate at the last step
    div_factor: float = 25.0            # onecycle: initial lr = lr / div_factor
    final_div_factor: float = 1e4       # onecycle: final lr = initial lr / final_div_factor
    betas: Tuple[float, float] = (0.9, 0.99)


@dataclass
class DataConfig:
    source: str = "synthetic"           # "synthetic" or a folder in the official layout
    flip: bool = True                   # random horizontal flip of image and depth together
    skip_bad: bool = False              # skip unreadable/mismatched files instead of stopping
    synthetic_scenes: int = 512         # number of procedural scenes
    synthetic_seed: int = 0
    num_workers: int = 0


@dataclass
class TrainConfig:
    steps: int = 300_000
    batch_size: int = 8                 # per process
    seed: int = 420
    save_every: int = 500
    keep_last: int = 3                  # step checkpoints kept besides last.pt
    log_every: int = 10
    image_every: int = 500
    grad_clip: float = 0.0              # max gradient norm (0 = off)
    amp: str = "auto"                   # "auto" (bf16 on CUDA, off on CPU) | "bf16" | "off"
    device: str = "auto"
    channels_last: bool = False         # U-Net in channels_last memory format
    compile: bool = False               # torch.compile the U-Net


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        cfg = cls()
        for section, values in d.items():
            if not hasattr(cfg, section):
                raise ValueError(f"unknown config section {section!r} (known: {', '.join(_sections(cfg))})")
            if not isinstance(values, dict):
                raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
            for key, value in values.items():
                set_field(cfg, f"{section}.{key}", value)
        validate(cfg)
        return cfg


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _sections(cfg) -> List[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _coerce(value, typ, name: str):
    """Convert a YAML/CLI value to the field's declared type, or raise a ValueError naming the field."""
    origin = get_origin(typ)
    if origin is Union and type(None) in get_args(typ):  # Optional[X]: None, "none" or "null", else an X
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        inner = [a for a in get_args(typ) if a is not type(None)]
        return _coerce(value, inner[0], name)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                value = float(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                v = value.strip()
                if v[:1] in "([" and v[-1:] in ")]":
                    v = v[1:-1]
                value = [x.strip() for x in v.split(",") if x.strip()]
            args = get_args(typ)
            elem = args[0]
            items = list(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, elem, name) for v in items)
            if len(items) != len(args):
                raise ValueError
            return tuple(_coerce(v, t, name) for v, t in zip(items, args))
    except (TypeError, ValueError):
        raise ValueError(f"config field {name}: cannot use {value!r} as {getattr(typ, '__name__', typ)}") from None
    raise TypeError(f"config field {name}: unsupported type {typ}")


def set_field(cfg: Config, dotted: str, value) -> None:
    """Set `section.key` to `value` (converted to the field's type); unknown names are an error."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ValueError(f"config override must look like section.key=value, got {dotted!r}")
    section, key = parts
    if section not in _sections(cfg):
        raise ValueError(f"unknown config section {section!r} in {dotted!r} (known: {', '.join(_sections(cfg))})")
    sub = getattr(cfg, section)
    hints = get_type_hints(type(sub))
    if key not in hints:
        raise ValueError(f"unknown config field {dotted!r} (fields of {section}: {', '.join(hints)})")
    setattr(sub, key, _coerce(value, hints[key], dotted))


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    """`["train.steps=100", "loss.w_tv=0"]` -> a new validated Config."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override must look like section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = raw.strip()  # converted to the field's type by set_field
        set_field(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def _check_choice(field: str, value, choices) -> None:
    """ValueError naming the field, the allowed values and the value given, when value is not one of them."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def _check_finite(cfg: Config) -> None:
    """Every float field (and float tuple) is a finite number: NaN or inf is never a useful setting."""
    for section in _sections(cfg):
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in vals):
                raise ValueError(f"{section}.{f.name} must be a finite number, got {v!r}")


def _check_device(name: str) -> None:
    if name == "auto" or name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        return
    if name.split(":")[0] in ("mps", "xpu", "hip", "meta"):
        return
    raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}")


def validate(cfg: Config) -> None:
    """Cross-field checks, with the field names in the message."""
    m, r, lo, s, t = cfg.model, cfg.render, cfg.loss, cfg.schedule, cfg.train
    _check_finite(cfg)
    down = 2 ** (len(m.width_mults) - 1)
    if len(m.width_mults) < 1 or min(m.width_mults) < 1:
        raise ValueError(f"model.width_mults must be positive integers, got {m.width_mults}")
    if m.image_size < 2 or m.image_size % down:
        raise ValueError(f"model.image_size={m.image_size} must be a multiple of 2^(len(width_mults)-1)={down}")
    for name in ("base_width", "plane_channels", "decoder_hidden", "pos_channels", "in_channels", "groups"):
        if getattr(m, name) < (0 if name == "pos_channels" else 1):
            raise ValueError(f"model.{name} must be positive, got {getattr(m, name)}")
    for w in (m.base_width * k for k in m.width_mults):
        if w % m.groups:
            raise ValueError(f"U-Net width {w} (model.base_width x width_mults) is not divisible by model.groups="
                             f"{m.groups}")
    _check_choice("model.plane_layout", m.plane_layout, ("native", "image", "lift"))
    _check_choice("render.sampling", r.sampling, SAMPLINGS)
    _check_choice("render.target_mode", r.target_mode, TARGET_MODES)
    r.renderer_options()  # validates every renderer option
    if not 0 < r.fov < 180 or r.radius <= 0:
        raise ValueError(f"render.fov in (0,180) and radius > 0 needed, got {r.fov}, {r.radius}")
    _check_choice("loss.recon", lo.recon, ("l1", "mse"))
    _check_choice("loss.depth", lo.depth, ("l1", "smooth_l1"))
    _check_choice("loss.clip_loss", lo.clip_loss, ("l1", "cosine"))
    _check_choice("loss.novel_opacity", lo.novel_opacity, ("all", "behind"))
    for name in ("lpips_canon_layers", "lpips_novel_layers"):
        if len(getattr(lo, name)) != 5:
            raise ValueError(f"loss.{name} needs 5 per-layer weights (LPIPS-VGG has 5 layers), got "
                             f"{getattr(lo, name)}")
    _check_choice("schedule.view_sampler", s.view_sampler, ("uniform", "gaussian"))
    _check_choice("schedule.lr_schedule", s.lr_schedule, ("onecycle", "warmup_cosine", "constant"))
    if not 0 <= s.p_novel_max <= 1:
        raise ValueError(f"schedule.p_novel_max must be in [0, 1], got {s.p_novel_max}")
    if s.lr <= 0:
        raise ValueError(f"schedule.lr must be > 0, got {s.lr}")
    for name in ("steps", "batch_size", "save_every", "log_every", "image_every"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.keep_last < 0:
        raise ValueError(f"train.keep_last must be >= 0, got {t.keep_last}")
    if t.grad_clip < 0:
        raise ValueError(f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    _check_choice("train.amp", t.amp, ("auto", "bf16", "off"))
    _check_device(t.device)
    weights = [f.name for f in dataclasses.fields(lo) if f.name.startswith("w_")] + ["clip_novel_start_weight"]
    for name in weights:
        if getattr(lo, name) < 0:
            raise ValueError(f"loss.{name} must be >= 0, got {getattr(lo, name)}")
    for name in ("lpips_canon_layers", "lpips_novel_layers"):
        if min(getattr(lo, name)) < 0:
            raise ValueError(f"loss.{name} must be >= 0, got {getattr(lo, name)}")
    if not all(0 <= b < 1 for b in s.betas):
        raise ValueError(f"schedule.betas must be in [0, 1), got {s.betas}")
    try:
        r.kernel()
    except ValueError as e:  # DepthKernel's message, in the config's field names
        raise ValueError(f"render.kernel_*: {e}".replace("DepthKernel.", "kernel_")) from None
    if cfg.data.num_workers < 0 or cfg.data.synthetic_scenes < 1:
        raise ValueError(f"data needs num_workers >= 0 and synthetic_scenes >= 1; got {cfg.data.num_workers}, "
                         f"{cfg.data.synthetic_scenes}")


def _official() -> Config:
    return Config()


def _paper() -> Config:
    c = Config()
    c.train.steps, c.train.batch_size = 400_000, 8
    lo = c.loss
    lo.recon, lo.w_recon, lo.w_depth = "mse", 1.0, 2.0
    lo.w_lpips_canon, lo.canon_perceptual_start, lo.w_clip_canon = 0.5, 0.0, 0.0
    lo.w_lpips_novel, lo.w_clip_novel, lo.w_tv = 0.5, 0.35, 0.1
    lo.clip_novel_start_weight, lo.clip_novel_ramp = 0.02, 100_000 / 400_000
    s = c.schedule
    s.view_sampler = "gaussian"
    s.lr_schedule, s.lr, s.lr_start, s.warmup = "warmup_cosine", 1e-4, 2e-6, 20_000 / 400_000
    return c


def _small() -> Config:
    c = Config()
    m = c.model
    m.image_size, m.pos_channels, m.base_width, m.width_mults = 64, 16, 32, (1, 2, 2, 4)
    m.plane_channels, m.decoder_hidden = 32, 64
    r = c.render
    r.n_coarse, r.n_fine, r.n_target = 24, 24, 24
    # CLIP's ViT-B/16 runs at 224x224 (~17 GFLOP per image): off on the CPU preset; LPIPS-VGG stays on.
    c.loss.w_clip_canon = c.loss.w_clip_novel = c.loss.clip_novel_start_weight = 0.0
    c.schedule.lr, c.schedule.lr_schedule, c.schedule.warmup = 5e-4, "onecycle", 0.05
    c.train.steps, c.train.batch_size, c.train.save_every, c.train.image_every = 1500, 4, 250, 250
    c.data.synthetic_scenes = 64
    return c


def _fast() -> Config:
    """`small` made to learn in under an hour on 2 CPU cores (the shipped model's preset). Each change was
    chosen by the collapse study (benchmarks/results/diagnosis.md):
    - each pixel's features lifted to its 3D point in every plane (model.plane_layout=lift) on "xyz" axes:
      the U-Net works in the image's own layout and never has to move content across the grid (a flip,
      transpose or zoom to the planes' scale, or a scatter along depth for the side planes); at equal
      steps (600) it cut the held-out object depth error from 0.18 ("image" layout) to 0.038
      (benchmarks/results/lift_ab.md). 3200 steps: 51 min on a 2-core AMD EPYC VM (models/README.md);
    - a free-space term (loss.w_free) and a softer depth-kernel floor (c_min 0.3): with the kernel's
      0.05 floor the gradients that clear space in front of the target are scaled down 20x and an opaque
      sheet forms in front of the scene; without the kernel the model learns the backdrop plane only;
    - no LPIPS (no pretrained VGG here; a random one only costs time) and 1024 scenes (less overfitting);
    - few novel-view steps (schedule.p_novel_max 0.1 instead of 0.4): without LPIPS/CLIP a novel step carries
      no colour loss, and the canonical steps are what teach colour; with carving on those novel steps
      (loss.w_carve: opacity where the input view shows empty space, in front of its depth map extended beyond
      the frame) and the opacity term only on rays that end behind the input's surface (loss.novel_opacity
      "behind"), so that the strip beyond the backdrop's edge, which only novel views see, stays empty.
      p 0.1 alone reached 26.4 dB co-visible but painted that strip (all pixels 12.1 dB;
      benchmarks/results/novel_ab.md); carving fixes the strip (benchmarks/results/carve.md)."""
    c = _small()
    c.model.plane_layout, c.render.plane_axes = "lift", "xyz"
    c.render.kernel_c_min = 0.3
    c.loss.w_free = 1.0
    c.loss.w_lpips_canon = c.loss.w_lpips_novel = 0.0
    c.schedule.p_novel_max = 0.1
    c.loss.w_carve, c.loss.novel_opacity = 1.0, "behind"
    c.train.steps, c.train.batch_size, c.train.save_every, c.train.image_every = 3200, 4, 250, 250
    c.data.synthetic_scenes = 1024
    return c


def _fast_carve() -> Config:
    """A carving fine-tune: 60 steps on a model trained without carving (`g3dr train --config fast-carve --init
    MODEL`), e.g. one from an older `fast` (p_novel_max 0.4, no carving). Half the steps are novel views, and on
    them
    - loss.w_carve: opacity where the input view shows empty space (in front of its depth map, extended
      beyond the frame by its edge pixels) is penalised; the strip beyond the wall's edge, which such a
      model paints with noise, becomes empty as in the truth;
    - loss.novel_opacity=behind: the opacity term asks only the rays that end behind the input's surface
      (which must cross it) to end on something, not every ray.
    On such a model (8 held-out scenes) the all-pixel novel-view PSNR rose from 18.0 to 21.0 dB (the strip
    alone from 11.7 to 23.4 dB), the co-visible PSNR moved from 24.8 to 24.5 (benchmarks/results/carve.md);
    lr 5e-5 instead of 2e-4 fixed only part of the strip (18.9 dB). The two carving settings come from `fast`;
    this preset changes the share of novel steps (0.5 from the first step), the learning rate and the length."""
    c = _fast()
    c.schedule.p_novel_max, c.schedule.p_novel_ramp, c.schedule.lr = 0.5, 0.0, 2e-4
    c.train.steps, c.train.save_every, c.train.image_every = 60, 10, 20
    return c


def _tiny() -> Config:
    c = _small()
    m = c.model
    m.image_size, m.pos_channels, m.base_width, m.width_mults = 16, 4, 8, (1, 2)
    m.plane_channels, m.decoder_hidden, m.attn_heads, m.attn_dim_head = 8, 16, 2, 8
    r = c.render
    r.n_coarse, r.n_fine, r.n_target = 8, 8, 8
    c.loss.allow_random_init = True
    c.train.steps, c.train.batch_size, c.train.save_every, c.train.image_every, c.train.log_every = 4, 2, 2, 2, 1
    c.data.synthetic_scenes = 8
    return c


PRESETS = {"official": _official, "paper": _paper, "small": _small, "fast": _fast, "fast-carve": _fast_carve,
           "tiny": _tiny}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg


def _yaml():
    try:
        import yaml
    except ImportError as e:
        raise ImportError(f"PyYAML is needed for config files: pip install 'g3dr[app]' ({e})") from e
    return yaml


def save_yaml(cfg: Config, path: Union[str, Path]) -> None:
    """Write the config as YAML (atomic)."""
    yaml = _yaml()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def load_yaml(path: Union[str, Path]) -> Config:
    yaml = _yaml()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ValueError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a config file must be a mapping of sections, got {type(d).__name__}")
    return Config.from_dict(d)


def resolve(name_or_file: str, overrides: Optional[List[str]] = None) -> Config:
    """A preset name or a YAML file, then `section.key=value` overrides."""
    p = Path(name_or_file)
    cfg = load_yaml(p) if (p.suffix in (".yaml", ".yml") or p.is_file()) else preset(name_or_file)
    return apply_overrides(cfg, overrides or [])
