"""Where a model's novel-view error lies, on held-out synthetic scenes: PSNR over all pixels, over the
pixels the input view also sees, over hit pixels the input does not see (hidden), over the pixels whose
ray hits nothing in the truth (beyond the wall's edge), and over all pixels with that strip scored as
perfect (what the strip costs).

    PYTHONPATH=$PWD python benchmarks/novel_breakdown.py MODEL [MODEL ...] --scenes 8
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

import g3dr
from g3dr.heldout import held_out_indices, score_scene
from g3dr.synthetic import make_scene


def _psnr(se: torch.Tensor) -> float:
    return float("nan") if se.numel() == 0 else 10 * math.log10(1 / max(float(se.mean()), 1e-12))


def breakdown(path: str, scenes: int) -> dict:
    model = g3dr.load(path).eval()
    rows = {"all": [], "covisible": [], "hidden": [], "beyond_wall": [], "all_wall_strip_perfect": []}
    fractions = []
    for index in held_out_indices(scenes):
        for v in score_scene(model, make_scene(index), keep_views=True)["pictures"]["novel"]:
            se = (v["pred_rgb"].double() - v["true_rgb"].double()).pow(2).mean(0)   # [H,W]
            miss = v["true_depth"] == 0
            cov = v["covis"].bool()
            hidden = ~miss & ~cov
            rows["all"].append(_psnr(se))
            rows["covisible"].append(_psnr(se[cov]))
            rows["hidden"].append(_psnr(se[hidden]))
            rows["beyond_wall"].append(_psnr(se[miss]))
            rows["all_wall_strip_perfect"].append(_psnr(se.masked_fill(miss, 0)))
            fractions.append((float(miss.double().mean()), float(hidden.double().mean())))
    out = {k: float(np.nanmean(v)) for k, v in rows.items()}
    f = np.mean(fractions, 0)
    out.update(model=path, scenes=scenes, fraction_beyond_wall=float(f[0]), fraction_hidden=float(f[1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--scenes", type=int, default=8)
    a = p.parse_args()
    for m in a.models:
        print(json.dumps(breakdown(m, a.scenes)))


if __name__ == "__main__":
    main()
