"""Parity of g3dr_kernels.compat with the official renderers, run against *your* checkouts of them
(nothing of theirs is included here: EG3D's code is under a non-commercial licence).

    python benchmarks/official_parity.py --eg3d /path/to/eg3d/eg3d --g3dr-train /path/to/G3DR/train.py \
        [--backend torch|cpu|triton|cuda] [--device cpu|cuda] [--out results.md]

--eg3d is the folder holding `training/volumetric_rendering/` (EG3D's renderer imports only torch);
--g3dr-train is G3DR's train.py, whose renderer extension (from `class GradientScaler` to `def main`)
is executed with torch, F, STYLE='lod_no', GRAD_CLIP_MIN=0.05 and random.random (the rest of train.py
needs lpips, clip and accelerate and is not run). For each seed both renderers run from the same
torch and Python seeds; the table gives the largest difference of every returned value and of the
gradients of a fixed weighted sum of them with respect to the planes and decoder weights.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays  # noqa: E402
from g3dr_kernels.compat import EG3DImportanceRenderer, G3DRImportanceRenderer, OSGDecoder  # noqa: E402


def load_official(eg3d: str, g3dr_train: str):
    sys.path.insert(0, eg3d)
    from training.volumetric_rendering import math_utils
    from training.volumetric_rendering.renderer import (ImportanceRenderer, project_onto_planes, sample_from_3dgrid,
                                                        sample_from_planes)
    src = Path(g3dr_train).read_text()
    ns = dict(torch=torch, F=F, STYLE="lod_no", GRAD_CLIP_MIN=0.05, random=random.random, sys=sys)
    exec(compile(src[src.index("class GradientScaler"):src.index("def main(config)")], g3dr_train, "exec"), ns)
    g3dr = ns["extend_render"](ImportanceRenderer, sample_from_planes, sample_from_3dgrid, project_onto_planes,
                               math_utils)
    return ImportanceRenderer, g3dr


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eg3d", required=True)
    p.add_argument("--g3dr-train", required=True)
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--out")
    a = p.parse_args(argv)
    EG3D, G3DR = load_official(a.eg3d, a.g3dr_train)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    B, C, H, res = 2, 8, 16, 8
    dec = OSGDecoder(C, {"decoder_lr_mul": 1, "decoder_output_dim": 3}).to(dev)
    planes = (0.5 * torch.randn(B, 3, C, H, H)).to(dev).requires_grad_()
    c2w = g3dr_cam2world(torch.tensor([math.pi / 2, math.pi / 2 + 0.3]), torch.tensor([math.pi / 2, math.pi / 2 - 0.1]))
    ro, rd = (t.to(dev) for t in g3dr_rays(c2w, 30.0, res))  # 30 degrees: the outer rays miss the box
    depth_img = (5.0 + 0.3 * torch.rand(B, 1, res, res)).to(dev)

    def run(r, extra, seed, **opt):
        opts = dict(ray_start="auto", ray_end="auto", box_warp=2, depth_resolution=12, depth_resolution_importance=10,
                    disparity_space_sampling=False, clamp_mode="softplus")
        opts.update(opt)
        torch.manual_seed(seed)
        random.seed(seed)
        planes.grad = None
        for q in dec.parameters():
            q.grad = None
        out = r(planes, dec, ro, rd, opts, *extra)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=dev).reshape(o.shape)).sum() for o in out[:3])
        loss.backward()
        return [o.detach() for o in out], [planes.grad.clone()] + [q.grad.clone() for q in dec.parameters()]

    rows = []

    def compare(name, official, ours):
        (oa, ga), (ob, gb) = official, ours
        diffs = [(x - y).abs().max().item() for x, y in zip(oa, ob)]
        gd = max((x - y).abs().max().item() / max(x.abs().max().item(), 1e-30) for x, y in zip(ga, gb))
        rows.append((name, diffs, gd))
        print(f"{name:34s} " + " ".join(f"{d:.1e}" for d in diffs) + f" | grads (relative) {gd:.1e}", flush=True)

    cases = [(f"EG3D seed {s}", EG3D, EG3DImportanceRenderer, (), s, {}) for s in range(a.seeds)]
    cases += [("EG3D density_noise 0.5", EG3D, EG3DImportanceRenderer, (), 7, dict(density_noise=0.5)),
              ("EG3D ray_start/end 4/6", EG3D, EG3DImportanceRenderer, (), 8, dict(ray_start=4.0, ray_end=6.0)),
              ("EG3D disparity, 4/6", EG3D, EG3DImportanceRenderer, (), 8,
               dict(ray_start=4.0, ray_end=6.0, disparity_space_sampling=True))]
    cases += [(f"G3DR seed {s}, importance_depth", G3DR, G3DRImportanceRenderer, (depth_img,), s, {})
              for s in range(a.seeds)]
    cases += [("G3DR no importance_depth", G3DR, G3DRImportanceRenderer, (), 3, {})]
    for name, off_cls, our_cls, extra, seed, opt in cases:
        compare(name, run(off_cls(), extra, seed, **opt), run(our_cls(backend=a.backend), extra, seed, **opt))
    if a.out:
        lines = [f"# compat vs official renderers (backend {a.backend}, device {a.device}, float32)", "",
                 "max |official - ours| per returned value (rgb, depth, weight_total[, depths_mid]) and over "
                 "the gradients (relative to the largest gradient entry of each tensor: planes, decoder weights and biases)", "",
                 f"machine: {_machine()}, torch {torch.__version__}", "",
                 "| case | returns | gradients |", "|---|---|---|"]
        lines += [f"| {n} | {' / '.join(f'{d:.1e}' for d in ds)} | {g:.1e} |" for n, ds, g in rows]
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
