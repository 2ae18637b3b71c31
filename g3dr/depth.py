"""Monocular depth for a folder of images, written in G3DR's depth convention (`g3dr depth`).

A transformers depth estimator (Depth Anything V2, DPT, ...) is loaded from a LOCAL directory, run
over every image under a folder, and its output converted into G3DR's training layout: beside
`name.jpg` a 16-bit `name_depth.png` with depth = value / 65536 * 2 + 4 in [4, 6), larger = farther
(see `g3dr.depthio`). Nothing is downloaded: get the weights once on a machine with network, e.g.

    huggingface-cli download depth-anything/Depth-Anything-V2-Small-hf --local-dir DIR

The conversion (`to_g3dr_depth`) is the one place where a model's output meets G3DR's units;
`g3dr.generate` uses it for LDM3D's depth too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .depthio import DEPTH_OFFSET, DEPTH_RANGE, write_depth_png
from .devices import pick_device

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIX = "_depth.png"
# Largest depth a 16-bit file holds: value 65535 -> 4 + 2 * 65535/65536. The far end of the
# normalised range maps exactly there, so no converted depth is clipped on writing.
DEPTH_SPAN = DEPTH_RANGE * 65535.0 / 65536.0
KINDS = ("inverse", "depth")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit; larger maps are subsampled for the range only


class DepthModelNotFoundError(FileNotFoundError):
    """The local depth-model directory is missing or incomplete."""


def _model_missing_message(model_dir: Path, missing: Sequence[str]) -> str:
    return (f"depth model directory {model_dir} is {'missing' if not model_dir.is_dir() else 'incomplete'}"
            f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}. It must hold a transformers depth "
            f"model saved with save_pretrained: config.json, weights (one of {', '.join(_WEIGHT_FILES[:2])} or a "
            f"sharded index) and preprocessor_config.json. Weights are never downloaded here; on a machine with "
            f"network run `huggingface-cli download {DEFAULT_DEPTH_MODEL} --local-dir {model_dir}` "
            f"(or another Depth Anything V2 / DPT depth model) and copy the folder over.")


def check_depth_model_dir(model_dir: Union[str, Path]) -> Path:
    """Raise `DepthModelNotFoundError` unless `model_dir` holds config, weights and preprocessor config."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise DepthModelNotFoundError(_model_missing_message(model_dir, []))
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (model_dir / n).is_file()]
    if not any((model_dir / n).is_file() for n in _WEIGHT_FILES):
        missing.append("weights (" + " | ".join(_WEIGHT_FILES) + ")")
    if missing:
        raise DepthModelNotFoundError(_model_missing_message(model_dir, missing))
    return model_dir


def default_device() -> torch.device:
    """cuda when available, else cpu (g3dr.devices.pick_device with no device named)."""
    return pick_device()


class DepthEstimator:
    """A transformers depth model + its image processor, ready to run on a list of PIL images.

    `kind` says what the model outputs: "inverse" (relative inverse depth / disparity, larger =
    nearer: Depth Anything relative models, DPT/MiDaS) or "depth" (larger = farther: metric models
    such as ZoeDepth or Depth Anything metric checkpoints). `load_depth_model` infers it from the config.
    """

    def __init__(self, model: torch.nn.Module, processor, device: torch.device, kind: str = "inverse",
                 dtype: torch.dtype = torch.float32):
        if kind not in KINDS:
            raise ValueError(f"DepthEstimator: kind must be one of {KINDS}, got {kind!r}")
        self.model, self.processor, self.device, self.kind, self.dtype = model, processor, device, kind, dtype

    @torch.inference_mode()
    def predict(self, images: Sequence) -> List[torch.Tensor]:
        """PIL RGB images (any sizes) -> raw model outputs, each [H, W] float32 on the CPU at its image's size.

        Values are in the model's own units (see `kind`); images of equal size run as one batch.
        """
        if len(images) == 0:
            return []
        out: List[Optional[torch.Tensor]] = [None] * len(images)
        groups: dict = {}
        for i, im in enumerate(images):
            groups.setdefault(im.size, []).append(i)
        for (w, h), idx in groups.items():
            inputs = self.processor(images=[images[i] for i in idx], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
            pred = self.model(pixel_values=pixel_values).predicted_depth  # [B, h', w'] (or [B, 1, h', w'])
            if pred.dim() == 3:
                pred = pred[:, None]
            pred = F.interpolate(pred.float(), size=(h, w), mode="bicubic", align_corners=False)
            for j, i in enumerate(idx):
                out[i] = pred[j, 0].cpu()
        return out  # type: ignore[return-value]


def _infer_kind(config) -> str:
    if getattr(config, "depth_estimation_type", "relative") == "metric":
        return "depth"
    if getattr(config, "model_type", "") == "zoedepth":
        return "depth"
    return "inverse"


def load_depth_model(model_dir: Union[str, Path], device: Union[str, torch.device, None] = None,
                     dtype: Optional[torch.dtype] = None, kind: Optional[str] = None) -> DepthEstimator:
    """Load a transformers depth model (Depth Anything V2, DPT, ...) from a LOCAL directory.

    `model_dir` must hold what `save_pretrained` writes (config.json, weights, preprocessor_config.json);
    it is opened with `local_files_only=True`, so nothing is downloaded. `device` defaults to cuda when
    available; `dtype` to float32. `kind` ("inverse" | "depth") overrides the output kind inferred from
    the config (relative models -> "inverse", metric ones -> "depth").
    Raises `DepthModelNotFoundError` naming the directory, the files expected and the model to put there.
    """
    model_dir = check_depth_model_dir(model_dir)
    try:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation  # optional: g3dr[depth]
    except ImportError as e:
        raise ImportError("g3dr depth needs transformers: pip install 'g3dr[depth]'") from e
    device = pick_device(device)
    dtype = dtype or torch.float32
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DepthModelNotFoundError(f"cannot load the depth model in {model_dir}: {e}\n"
                                      + _model_missing_message(model_dir, [])) from e
    model = model.to(device=device, dtype=dtype).eval()
    return DepthEstimator(model, processor, device, kind or _infer_kind(model.config), dtype)


def _range(values: torch.Tensor, lo_pct: float, hi_pct: float) -> Tuple[float, float]:
    if values.numel() > _QUANTILE_MAX:  # an even subsample is plenty for a percentile range
        values = values[:: math.ceil(values.numel() / _QUANTILE_MAX)]
    q = torch.quantile(values, torch.tensor([lo_pct / 100.0, hi_pct / 100.0], dtype=values.dtype))
    return float(q[0]), float(q[1])


def to_g3dr_depth(pred, kind: str = "inverse", lo_pct: float = 1.0, hi_pct: float = 99.0) -> torch.Tensor:
    """A model's relative depth map -> depth [H, W] float32 in G3DR's convention ([4, 6), larger = farther).

    Mapping (affine, because relative predictions are only known up to scale and shift):
        lo, hi = the lo_pct / hi_pct percentiles of the finite values of `pred`
        n      = clamp((pred - lo) / (hi - lo), 0, 1)
        near   = n if kind == "inverse" else 1 - n        (1 = nearest)
        depth  = 4 + DEPTH_SPAN * (1 - near),   DEPTH_SPAN = 2 * 65535/65536
    so the nearest percentile lands on 4, the farthest on the largest value a 16-bit file holds
    (6 - 2/65536), and the `lo_pct`% / (100 - `hi_pct`)% extremes (sky, specks) are clipped instead of
    squeezing the rest. kind="inverse": disparity, larger = nearer (Depth Anything, DPT, LDM3D);
    kind="depth": larger = farther. Inverse depth is mapped linearly, not through 1/x: its unknown
    shift makes 1/x meaningless. A constant map (hi - lo <= 1e-6 max(|lo|, |hi|)) gives depth 5 everywhere (the plane
    through the origin) rather than dividing by zero; non-finite values are put at the far end.

    pred: [H, W] tensor or array (any float or int dtype). Returns a new float32 CPU tensor.
    """
    if kind not in KINDS:
        raise ValueError(f"to_g3dr_depth: kind must be one of {KINDS}, got {kind!r}")
    if not (0.0 <= lo_pct < hi_pct <= 100.0):
        raise ValueError(f"to_g3dr_depth: need 0 <= lo_pct < hi_pct <= 100, got lo_pct={lo_pct}, hi_pct={hi_pct}")
    if isinstance(pred, np.ndarray):
        pred = torch.from_numpy(np.ascontiguousarray(pred))
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"to_g3dr_depth: pred must be a torch.Tensor or numpy array, got {type(pred).__name__}")
    if pred.dim() != 2 or pred.numel() == 0:
        raise ValueError(f"to_g3dr_depth: pred must be a non-empty [H, W] map, got shape {tuple(pred.shape)}")
    x = pred.detach().to("cpu", torch.float64)
    finite = torch.isfinite(x)
    if not bool(finite.any()):
        raise ValueError(f"to_g3dr_depth: pred {tuple(pred.shape)} has no finite value")
    lo, hi = _range(x[finite], lo_pct, hi_pct)
    if not (hi - lo > 1e-6 * max(abs(lo), abs(hi))):  # relative: a model's scale is arbitrary (1e-9 .. 1e4)
        out = torch.full(x.shape, DEPTH_OFFSET + DEPTH_RANGE / 2, dtype=torch.float32)
        out[~finite] = DEPTH_OFFSET + DEPTH_SPAN
        return out
    n = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    near = n if kind == "inverse" else 1.0 - n
    near = torch.where(finite, near, torch.zeros_like(near))
    return (DEPTH_OFFSET + DEPTH_SPAN * (1.0 - near)).float()


def depth_path_for(image: Path, in_dir: Path, out_dir: Optional[Path]) -> Path:
    """`a/b/x.jpg` -> `a/b/x_depth.png` beside it, or `OUT/b/x_depth.png` mirrored under out_dir."""
    name = image.stem + DEPTH_SUFFIX
    if out_dir is None:
        return image.with_name(name)
    return out_dir / image.parent.relative_to(in_dir) / name


def list_images(in_dir: Union[str, Path]) -> List[Path]:
    """Every .jpg/.jpeg/.png under in_dir (recursive, sorted), minus depth maps and temp files."""
    in_dir = Path(in_dir)
    found = []
    for p in in_dir.rglob("*"):
        low = p.name.lower()
        if not p.is_file() or not low.endswith(IMAGE_EXTENSIONS) or low.startswith("."):
            continue
        if low.endswith(DEPTH_SUFFIX) or ".tmp." in low:  # our own outputs and leftovers of interrupted writes
            continue
        found.append(p)
    return sorted(found)


@dataclass
class DepthSummary:
    """What `estimate_depth_folder` did: depth files written, images skipped (already done), failures."""
    done: List[Path] = field(default_factory=list)
    skipped: List[Path] = field(default_factory=list)
    failed: List[Tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        s = f"depth: {len(self.done)} written, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"
        return s + "".join(f"\n  failed: {p}: {why}" for p, why in self.failed)


def _open_rgb(path: Path):
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def estimate_depth_folder(in_dir: Union[str, Path], out_dir: Union[str, Path, None] = None, *,
                          model_dir: Union[str, Path, None] = None, model: Optional[DepthEstimator] = None,
                          batch_size: int = 8, device: Union[str, torch.device, None] = None,
                          overwrite: bool = False, progress: bool = True, kind: Optional[str] = None,
                          lo_pct: float = 1.0, hi_pct: float = 99.0) -> DepthSummary:
    """Estimate depth for every image under `in_dir` and write G3DR depth files (a training folder).

    Images: .jpg/.jpeg/.png under in_dir, recursively, except `*_depth.png`. For `x.jpg` the output is
    `x_depth.png` beside it, or at the same relative path under `out_dir`; 16-bit, G3DR convention
    (`to_g3dr_depth` with `lo_pct`/`hi_pct`, per image), at the image's own size. Resumable: an image
    whose depth file exists is skipped unless `overwrite`. Writes are atomic (temp file, then rename),
    so an interrupted run leaves no half-written depth file. The model is `model` if given, else
    `load_depth_model(model_dir, device)` (loaded only when there is something to do). Images of equal
    size run in batches of `batch_size`. An image that cannot be read, or whose batch fails, is
    reported in the summary's `failed` with the reason; the rest of the folder still runs.
    `kind` overrides the model's output kind ("inverse" | "depth"; see `to_g3dr_depth`).
    Raises: FileNotFoundError/NotADirectoryError (in_dir), ValueError (no images, batch_size < 1, kind),
    PermissionError (out_dir not writable), DepthModelNotFoundError (model_dir).
    """
    in_dir = Path(in_dir).expanduser()
    if not in_dir.exists():
        raise FileNotFoundError(f"estimate_depth_folder: input folder not found: {in_dir}")
    if not in_dir.is_dir():
        raise NotADirectoryError(f"estimate_depth_folder: input is not a folder: {in_dir}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"estimate_depth_folder: batch_size must be an int >= 1, got {batch_size!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"estimate_depth_folder: kind must be one of {KINDS} or None (the model's), got {kind!r}")
    if model is None and model_dir is None:
        raise ValueError("estimate_depth_folder: give model_dir (a local depth-model folder) or model")
    out = Path(out_dir).expanduser() if out_dir is not None else None
    images = list_images(in_dir)
    if not images:
        raise ValueError(f"estimate_depth_folder: no images ({'/'.join(IMAGE_EXTENSIONS)}, other than "
                         f"*{DEPTH_SUFFIX}) found under {in_dir}")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"estimate_depth_folder: cannot create output folder {out}: {e}") from e
    summary = DepthSummary()
    todo: List[Tuple[Path, Path, Tuple[int, int]]] = []
    claimed: dict = {}
    for img in images:
        dst = depth_path_for(img, in_dir, out)
        if dst in claimed:  # x.jpg and x.png both map to x_depth.png
            summary.failed.append((img, f"its depth file {dst} is also the one of {claimed[dst]}; rename one"))
            continue
        claimed[dst] = img
        if dst.exists() and not overwrite:
            summary.skipped.append(img)
            continue
        try:
            with Image.open(img) as im:  # header only: the size, to batch equal sizes together
                size = im.size
        except Exception as e:
            summary.failed.append((img, f"not a readable image: {e}"))
            continue
        todo.append((img, dst, size))
    if not todo:
        return summary
    for d in sorted({dst.parent for _, dst, _ in todo}):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"estimate_depth_folder: cannot create output folder {d}: {e}") from e
        if not os.access(d, os.W_OK):
            raise PermissionError(f"estimate_depth_folder: output folder {d} is not writable")
    if model is None:
        model = load_depth_model(model_dir, device=device)
    kind = kind or model.kind
    todo.sort(key=lambda t: (t[2], str(t[0])))  # equal sizes next to each other -> full batches
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="depth")
    try:
        for batch in _batches(todo, batch_size):
            loaded, items = [], []
            for img, dst, _ in batch:
                try:
                    loaded.append(_open_rgb(img))
                    items.append((img, dst))
                except Exception as e:
                    summary.failed.append((img, f"not a readable image: {e}"))
            try:
                preds = model.predict(loaded)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory: report the batch, go on
                summary.failed.extend((img, f"depth model failed on its batch: {e}") for img, _ in items)
                bar.update(len(batch))
                continue
            for (img, dst), pred in zip(items, preds):
                try:
                    write_depth_png(dst, to_g3dr_depth(pred, kind, lo_pct, hi_pct))
                    summary.done.append(dst)
                except (OSError, ValueError) as e:
                    summary.failed.append((img, f"cannot write {dst}: {e}"))
            bar.update(len(batch))
    finally:
        bar.close()
    return summary
