"""Quality of a trained model against the project's targets: benchmarks/results/quality.{md,json}.

Synthetic (g3dr.heldout): held-out scenes never trained on, novel views at yaw +-15 deg and pitch
+-5 deg at the model's resolution:
  PSNR over co-visible pixels >= 26 dB, over all pixels >= 20 dB; median object depth error <= 0.05
  and <= 1/3 of a flat plane's; at most 10% of object pixels more than 0.1 in front of the truth.
Real images (optional, --real DIR of name.jpg + name_depth.png): fine-tune the model on them for
--finetune-steps with `g3dr train --init`, then score the input view (PSNR >= 24 dB against the input,
depth accuracy <= 0.3 against the input depth) and the novel views' NFS (at least half the input
depth's NFS).

    python benchmarks/quality.py                                   # the shipped model, 16 held-out scenes
    python benchmarks/quality.py --model runs/fast --real photos/ --finetune-steps 200
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from g3dr.demo import MODEL  # noqa: E402
from g3dr.evaluate import evaluate, machine_info  # noqa: E402
from g3dr.heldout import score  # noqa: E402
from g3dr.infer import load  # noqa: E402

# (key, label, target, higher is better)
SYNTH_TARGETS = [("psnr_covis", "novel-view PSNR, co-visible pixels (dB)", 26.0, True),
                 ("psnr_all", "novel-view PSNR, all pixels (dB)", 20.0, True),
                 ("depth_med_obj", "median object depth error", 0.05, False),
                 ("depth_ratio_to_flat", "object depth error / flat plane's", 1 / 3, False),
                 ("fog_obj", "fog: object pixels > 0.1 in front", 0.10, False),
                 ("canon_psnr", "input-view PSNR (dB)", None, True),
                 ("depth_med_bg", "median background depth error", None, False),
                 ("flat_med_obj", "flat plane: median object depth error", None, False),
                 ("opacity_front", "opacity in front of objects", None, False)]


def _met(v, target, higher) -> str:
    if target is None:
        return ""
    return "met" if (v >= target if higher else v <= target) else "not met"


def real_images(model_path: str, data: str, steps: int, work: Path, seed: int) -> dict:
    """Fine-tune on the folder, then evaluate the input view and novel views."""
    src = Path(model_path)
    if src.is_dir() and (src / "config.yaml").is_file():
        cfg_arg = str(src / "config.yaml")
    else:  # a model file: fine-tune with the config it was trained with (kept in the file)
        from g3dr.config import save_yaml
        work.mkdir(parents=True, exist_ok=True)
        cfg_arg = str(work / "model_config.yaml")
        save_yaml(load(model_path, device="cpu").cfg, cfg_arg)
    run = work / "finetune"
    cmd = [sys.executable, "-m", "g3dr", "train", "--config", cfg_arg, "--init", str(src), "--data", data,
           "--out", str(run), "--overwrite", "--quiet", "--max-steps", str(steps), f"train.seed={seed}",
           "data.source=" + data, "train.keep_last=0"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    ev = evaluate(run, data, metrics=("psnr", "nfs", "depth_accuracy"), n_scenes=100, progress=False,
                  yaw_offsets=(-0.26, 0.26), pitch_offsets=(-0.087, 0.087), sigma_scales=(1,))
    m = ev["metrics"]
    import torch
    from g3dr import metrics as M
    from g3dr.cameras import CANONICAL_PITCH, CANONICAL_YAW
    from g3dr.data import FolderDataset
    model = load(run, device="cpu")
    ds = FolderDataset(data, model.cfg.model.image_size)
    items = [ds[i] for i in range(len(ds))]
    depths = torch.stack([it["depth"][0] for it in items])
    lo, hi = ev["meta"]["nfs_bounds"]
    nfs_input = M.nfs(depths, lo, hi)
    canon = (torch.tensor([CANONICAL_YAW]), torch.tensor([CANONICAL_PITCH]))
    psnrs = [M.psnr(model.render(model.reconstruct(it["image"], it["depth"]), canon)["rgb"], it["image"][None]).mean
             for it in items]
    m["psnr_canonical"] = sum(psnrs) / len(psnrs)
    return {"images": len(ds), "finetune_steps": steps, "finetune_seconds": round(seconds, 1), "command": " ".join(cmd),
            "canon_psnr": m.get("psnr_canonical"), "depth_accuracy": m.get("depth_accuracy_canonical"),
            "nfs_novel": m.get("nfs_novel"), "nfs_input": nfs_input,
            "targets": {"canon_psnr": ">= 24 dB", "depth_accuracy": "<= 0.3", "nfs_novel": ">= nfs_input / 2"}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL), help="model file or run folder (default: the shipped model)")
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--real", default=None, help="folder of real images with depth to fine-tune on and score")
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=420)
    p.add_argument("--work", default="outputs/quality")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    model = load(a.model, device="cpu")
    s = score(model, n_scenes=a.scenes, progress=True)
    shown = Path(a.model).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else Path(a.model)
    report = {"model": str(shown), "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "synthetic": {"mean": s["mean"], "setup": s["setup"], "seconds": round(time.perf_counter() - t0, 1),
                            "per_scene": [{k: v for k, v in sc.items() if k != "views"} for sc in s["scenes"]]}}
    if a.real:
        report["real"] = real_images(a.model, a.real, a.finetune_steps, Path(a.work), a.seed)
    lines = [f"# Quality of `{report['model']}`", "",
             f"Machine: {report['machine']['machine']}; torch {report['machine']['torch']}; commit "
             f"{report['machine']['commit']}; {report['date']}. Command: `python benchmarks/quality.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             f"## Held-out synthetic scenes ({s['setup']['scenes']} scenes, indices {s['setup']['indices']}, family "
             f"{s['setup']['family_seed']}; novel views at yaw/pitch {s['setup']['offsets_deg']} deg; "
             f"{s['setup']['resolution']}x{s['setup']['resolution']}, {s['setup']['n_coarse']}+{s['setup']['n_fine']} "
             f"samples)", "", "| metric | value | target | |", "|---|---|---|---|"]
    for k, label, target, higher in SYNTH_TARGETS:
        v = s["mean"][k]
        tgt = "" if target is None else f"{'>=' if higher else '<='} {target:.3g}"
        lines.append(f"| {label} ({'higher' if higher else 'lower'} is better) | {v:.4g} | {tgt} | "
                     f"{_met(v, target, higher)} |")
    if a.real:
        r = report["real"]
        lines += ["", f"## Real images ({r['images']} images from {a.real}, fine-tuned {r['finetune_steps']} steps in "
                      f"{r['finetune_seconds']:.0f} s)", "", "| metric | value | target | |", "|---|---|---|---|",
                  f"| input-view PSNR (dB, higher better) | {r['canon_psnr']:.4g} | >= 24 | "
                  f"{_met(r['canon_psnr'], 24, True)} |",
                  f"| depth accuracy vs input depth (lower better) | {r['depth_accuracy']:.4g} | <= 0.3 | "
                  f"{_met(r['depth_accuracy'], 0.3, False)} |",
                  f"| novel-view NFS (higher better) | {r['nfs_novel']:.4g} | >= {r['nfs_input'] / 2:.4g} (input "
                  f"depth NFS {r['nfs_input']:.4g} / 2) | {_met(r['nfs_novel'], r['nfs_input'] / 2, True)} |"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
