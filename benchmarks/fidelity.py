"""The depth-kernel ablation (G3DR Table 4 / Table S1 on synthetic scenes with ground truth).

Trains the `fast` preset with the depth kernel, without it, and without depth supervision, three seeds
each (same data and budget), scores each with `g3dr.evaluate.evaluate` and `g3dr.heldout.score` on
held-out scenes, and writes benchmarks/results/fidelity.json, fidelity.md (mean and spread per arm,
the verdict), fidelity.png and fidelity_seeds.png. The work lives in g3dr.ablation (also
`g3dr eval --ablation`).

    python benchmarks/fidelity.py --steps 300 --scenes 256 --batch 4 --set model.image_size=32
    python benchmarks/fidelity.py --steps 2 --scenes 2 --batch 1 --seeds 1 --preset tiny --out /tmp/x --work /tmp/x
Finished runs in --work are reused (resume), so a rerun only re-evaluates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from g3dr.ablation import ABLATION_VARIANTS, ablation  # noqa: E402
from g3dr.evaluate import format_table  # noqa: E402


def _floats(text: str):
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per model")
    p.add_argument("--scenes", type=int, default=16, help="synthetic training scenes")
    p.add_argument("--batch", type=int, default=2, help="batch size")
    p.add_argument("--variants", default="kernel,no_kernel,no_depth",
                   help=f"comma-separated: {', '.join(ABLATION_VARIANTS)}")
    p.add_argument("--preset", default="fast", help="the preset every arm starts from")
    p.add_argument("--seeds", default="420,421,422", help="comma-separated training seeds per arm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every arm")
    p.add_argument("--eval-scenes", type=int, default=4, help="held-out scenes to evaluate on")
    p.add_argument("--yaw", type=_floats, default=(-0.4, -0.2, 0.0, 0.2, 0.4), help="yaw offsets (radians)")
    p.add_argument("--pitch", type=_floats, default=(0.0, 0.15), help="pitch offsets (radians)")
    p.add_argument("--sigma-scales", type=_floats, default=(1, 5, 10, 50), help="density scales (Table S1)")
    p.add_argument("--geometry-resolution", type=int, default=64, help="occupancy / marching-cubes grid")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="report folder")
    p.add_argument("--work", default="outputs/fidelity", help="training runs folder (reused when finished)")
    p.add_argument("--name", default="fidelity", help="report file stem")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    report = ablation(a.out, a.work, steps=a.steps, scenes=a.scenes, batch=a.batch,
                      variants=tuple(v.strip() for v in a.variants.split(",") if v.strip()), preset_name=a.preset,
                      seeds=tuple(int(x) for x in a.seeds.split(",") if x.strip()), overrides=tuple(a.set),
                      eval_scenes=a.eval_scenes, yaw_offsets=a.yaw, pitch_offsets=a.pitch,
                      sigma_scales=a.sigma_scales, geometry_resolution=a.geometry_resolution, name=a.name,
                      device=a.device, progress=not a.quiet)
    for v, res in report["variants"].items():
        print(f"\n== {v} ==\n{format_table(res)}")
    print("\n".join(report["verdict"]))
    print(f"\nwrote {Path(a.out) / (a.name + '.json')}, .md, .png, _seeds.png")
    return report


if __name__ == "__main__":
    main()
