"""G3DR's losses, and the frozen networks they use (LPIPS-VGG, CLIP) loaded from local files.

Pretrained weights are never downloaded here. LPIPS needs torchvision's VGG16 ImageNet weights
(`vgg16-397923af.pth`: `loss.vgg_weights`, or the torch hub cache) plus LPIPS's own linear heads
(shipped inside the lpips package); CLIP needs an open_clip checkpoint (`loss.clip_weights`, or
the open_clip / Hugging Face cache). Missing files are an error that says which file and how to
get it; `loss.allow_random_init=true` (tests, the CPU demo) uses random networks with a warning.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VGG16_FILE = "vgg16-397923af.pth"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that the config asks for are not on this machine."""


def _need_extra(name: str, extra: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"{name} is needed for this loss: pip install 'g3dr[{extra}]' ({e})") from e


def _freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def vgg16_file(path: str) -> Optional[Path]:
    """The VGG16 weights LPIPS uses: `path` (loss.vgg_weights; MissingWeightsError when it is not a
    file), else torchvision's cache file when present, else None (LPIPS would start from random)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(f"loss.vgg_weights={path}: file not found. It should be torchvision's VGG16 "
                                      f"ImageNet checkpoint {VGG16_FILE} (https://download.pytorch.org/models/"
                                      f"{VGG16_FILE}).")
        return p
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" / VGG16_FILE
    return hub if hub.is_file() else None


def load_lpips(cfg: LossConfig) -> nn.Module:
    """A frozen lpips.LPIPS(net='vgg') with VGG16 weights from a local file (see module docstring)."""
    lpips = _need_extra("lpips", "train")
    vgg_file = vgg16_file(cfg.vgg_weights)
    if vgg_file is None and not cfg.allow_random_init:
        raise MissingWeightsError(
            f"LPIPS-VGG needs torchvision's VGG16 ImageNet weights, not found: set loss.vgg_weights=/path/to/{VGG16_FILE} "
            f"or put the file in $TORCH_HOME/hub/checkpoints/ (download https://download.pytorch.org/models/{VGG16_FILE} "
            f"on a machine with network); loss.allow_random_init=true trains with a random VGG (tests only).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation chatter inside lpips
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if vgg_file is not None:
        state = torch.load(vgg_file, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        mine = net.net.state_dict()
        if not feats:
            raise MissingWeightsError(f"{vgg_file}: not a torchvision VGG16 checkpoint (no 'features.*' keys)")
        new = {}
        for k in mine:  # lpips keeps torchvision's layer indices: slice{n}.{index}.{weight|bias}
            idx_param = k.split(".", 1)[1]
            if idx_param not in feats:
                raise MissingWeightsError(f"{vgg_file}: key features.{idx_param} missing (needed by LPIPS)")
            new[k] = feats[idx_param]
        net.net.load_state_dict(new)
    else:
        warnings.warn("LPIPS-VGG runs with a RANDOM VGG16 (loss.allow_random_init=true): perceptual losses are "
                      "not meaningful; point loss.vgg_weights at vgg16-397923af.pth for real training.")
    return _freeze(net)


def register_tiny_clip() -> str:
    """Register a tiny open_clip ViT config ('g3dr-tiny-vit', 32x32 input) for tests; returns its name."""
    open_clip = _need_extra("open_clip", "train")
    name = "g3dr-tiny-vit"
    if name not in open_clip.list_models():
        cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                "head_width": 16},
               "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
        d = Path(tempfile.mkdtemp(prefix="g3dr-clipcfg-"))
        (d / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(d)
    return name


def load_clip(cfg: LossConfig) -> nn.Module:
    """A frozen open_clip image encoder: model `loss.clip_model` with weights `loss.clip_weights`
    (a local file), else the OpenAI weights from the local cache; random only with allow_random_init."""
    open_clip = _need_extra("open_clip", "train")
    name = register_tiny_clip() if cfg.clip_model == "g3dr-tiny-vit" else cfg.clip_model
    if name not in open_clip.list_models():
        raise ValueError(f"loss.clip_model={cfg.clip_model!r} is not an open_clip model name")
    if cfg.clip_weights:
        p = Path(cfg.clip_weights).expanduser()
        if not p.is_file():
            raise MissingWeightsError(f"loss.clip_weights={cfg.clip_weights}: file not found (an open_clip checkpoint "
                                      f"for {name}, e.g. open_clip_pytorch_model.bin of timm/vit_base_patch16_clip_224"
                                      f".openai on the Hugging Face hub)")
        model = open_clip.create_model(name, pretrained=str(p))
    else:
        try:
            model = open_clip.create_model(name, pretrained="openai")
        except Exception as e:  # offline, not cached
            if not cfg.allow_random_init:
                raise MissingWeightsError(
                    f"CLIP {name} weights not found locally ({type(e).__name__}: {str(e)[:200]}). Set "
                    f"loss.clip_weights=/path/to/open_clip_pytorch_model.bin (download "
                    f"timm/vit_base_patch16_clip_224.openai from the Hugging Face hub on a machine with network), "
                    f"or set the CLIP weights to 0 (loss.w_clip_canon=0 loss.w_clip_novel=0 "
                    f"loss.clip_novel_start_weight=0).") from e
            warnings.warn(f"CLIP {name} runs with RANDOM weights (loss.allow_random_init=true): CLIP losses are not "
                          f"meaningful.")
            model = open_clip.create_model(name, pretrained=None)
    return _freeze(model.visual)


class CLIPEmbed(nn.Module):
    """images [B,3,H,W] in [0,1] -> CLIP image embeddings, resized to the encoder's input size."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        size = getattr(visual, "image_size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.visual((x - self.mean) / self.std)


def tv_loss(depth: torch.Tensor) -> torch.Tensor:
    """Official total variation on [B,1,H,W]: mean squared horizontal + vertical differences."""
    return (depth[..., :, 1:] - depth[..., :, :-1]).pow(2).mean() + (depth[..., 1:, :] - depth[..., :-1, :]).pow(2).mean()


def recon_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Images in [0,1], compared on G3DR's [-1,1] scale (as the official code does)."""
    a, b = pred * 2 - 1, target * 2 - 1
    return F.l1_loss(a, b) if kind == "l1" else F.mse_loss(a, b)


def depth_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(pred, target) if kind == "l1" else F.smooth_l1_loss(pred, target, beta=0.1)


def free_space_loss(weights: torch.Tensor, t_mid: torch.Tensor, depth: torch.Tensor, margin: float) -> torch.Tensor:
    """Opacity accumulated in front of the target surface: weights, t_mid [B,R,S-1] (interval weights and
    mid depths), depth [B,1,H,W] with H*W = R -> mean over rays of sum_i w_i [t_i < depth - margin].
    Zero when the space between the camera and the surface is empty: it penalises fog directly."""
    target = depth.reshape(depth.shape[0], -1, 1)
    return carve_loss(weights, t_mid < target - margin)


def carve_loss(weights: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Opacity a novel view puts where the input view shows empty space: weights [B,R,S-1] (interval
    weights), empty [B,R,S-1] bool (g3dr.cameras.input_view_regions at the interval mid points) ->
    mean over rays of sum_i w_i [empty_i]."""
    return (weights * empty).sum(-1).mean()


def clip_loss(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(a, b) if kind == "l1" else (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def lpips_layers(net: nn.Module, pred: torch.Tensor, target: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum over LPIPS-VGG's five layers of the per-layer distances (mean over the batch);
    images in [0,1]."""
    _, per_layer = net(pred * 2 - 1, target * 2 - 1, retPerLayer=True)
    return sum(w * layer.mean() for w, layer in zip(weights, per_layer) if w != 0) + pred.sum() * 0


class Criterion(nn.Module):
    """All of G3DR's loss terms for one branch. The frozen networks are built only when some weight
    needs them, are never wrapped in DDP, and run without autograd state on the ground-truth side."""

    def __init__(self, cfg: LossConfig, need_lpips: bool, need_clip: bool):
        super().__init__()
        self.cfg = cfg
        self.lpips = load_lpips(cfg) if need_lpips else None
        self.clip = CLIPEmbed(load_clip(cfg)) if need_clip else None

    def forward(self, branch: str, out: Dict[str, torch.Tensor], image: torch.Tensor, depth: torch.Tensor,
                weights: Dict) -> Dict[str, torch.Tensor]:
        """out: rendered rgb [B,3,H,W] in [0,1], depth [B,1,H,W], opacity [B,1,H,W]; image, depth: the
        input view. Returns each weighted term and "total"."""
        c, w = self.cfg, weights[branch]
        terms: Dict[str, torch.Tensor] = {}
        if branch == "canon":
            terms["recon"] = w["recon"] * recon_loss(out["rgb"], image, c.recon)
            terms["depth"] = w["depth"] * depth_loss(out["depth"], depth, c.depth)
            if w.get("free") and "weights" in out:
                terms["free"] = w["free"] * free_space_loss(out["weights"], out["t_mid"], depth, c.free_margin)
            layers = c.lpips_canon_layers
        else:
            terms["tv"] = w["tv"] * tv_loss(out["depth"])
            if w.get("carve") and "empty" in out:
                terms["carve"] = w["carve"] * carve_loss(out["weights"], out["empty"])
            layers = c.lpips_novel_layers
        if w["lpips"] and self.lpips is not None:
            terms["lpips"] = w["lpips"] * lpips_layers(self.lpips, out["rgb"], image, layers)
        if w["clip"] and self.clip is not None:
            with torch.no_grad():
                ref = self.clip(image)
            terms["clip"] = w["clip"] * clip_loss(self.clip(out["rgb"]), ref, c.clip_loss)
        miss = 1 - out["opacity"]
        if branch == "novel" and "ends_behind" in out:  # loss.novel_opacity=behind: only rays that must hit
            miss = miss * out["ends_behind"].reshape(miss.shape)
        terms["opacity"] = weights["opacity"] * miss.mean()
        terms["total"] = sum(terms.values())
        return terms


def needs(cfg) -> Dict[str, bool]:
    """Which frozen networks any step of this config will use."""
    lo = cfg.loss
    return {"lpips": max(lo.w_lpips_canon, lo.w_lpips_novel) > 0,
            "clip": max(lo.w_clip_canon, lo.w_clip_novel, lo.clip_novel_start_weight) > 0}
