"""Short G3DR trainings over a grid of settings, each scored on held-out scenes: the table behind the
collapse diagnosis (benchmarks/results/diagnosis.md).

Every arm is one `g3dr train` run of a preset with `section.key=value` overrides, followed by
g3dr.heldout.score on scenes never trained on. The table holds, per arm: the last quarter's median
training diagnostics (canonical depth error on object and background pixels, fog, opacity) and the
held-out novel-view numbers (PSNR over co-visible and all pixels, median object depth error and its
ratio to a flat plane, fog).

    python benchmarks/diagnose.py --steps 300 --jobs 1                  # the built-in grid, on this machine
    python benchmarks/diagnose.py --arms "aligned=model.plane_layout=image render.plane_axes=xyz" ...
    python benchmarks/diagnose.py --device cuda --jobs 8 --steps 1500   # a GPU runs the arms side by side
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
START = time.perf_counter()
ALIGNED = "model.plane_layout=image render.plane_axes=xyz"
NO_PERCEPTUAL = "loss.w_lpips_canon=0 loss.w_lpips_novel=0"
# name -> overrides on the preset (the collapse study: plane layout x depth kernel x free-space loss)
GRID = {
    "native": f"{NO_PERCEPTUAL}",
    "native-nokernel": f"{NO_PERCEPTUAL} render.depth_kernel=false",
    "native-free": f"{NO_PERCEPTUAL} loss.w_free=1",
    "aligned": f"{ALIGNED} {NO_PERCEPTUAL}",
    "aligned-nokernel": f"{ALIGNED} {NO_PERCEPTUAL} render.depth_kernel=false",
    "aligned-free": f"{ALIGNED} {NO_PERCEPTUAL} loss.w_free=1",
    "aligned-nokernel-free": f"{ALIGNED} {NO_PERCEPTUAL} render.depth_kernel=false loss.w_free=1",
    "aligned-free-kernel-late": f"{ALIGNED} {NO_PERCEPTUAL} loss.w_free=1 render.kernel_start=0.5",
    "aligned-free-cmin0.3": f"{ALIGNED} {NO_PERCEPTUAL} loss.w_free=1 render.kernel_c_min=0.3",
    "aligned-nokernel-free-lr1e-4": f"{ALIGNED} {NO_PERCEPTUAL} render.depth_kernel=false loss.w_free=1 "
                                    f"schedule.lr=1e-4",
    "aligned-nokernel-free-lr2e-3": f"{ALIGNED} {NO_PERCEPTUAL} render.depth_kernel=false loss.w_free=1 "
                                    f"schedule.lr=2e-3",
    "aligned-nokernel-free-s48": f"{ALIGNED} {NO_PERCEPTUAL} render.depth_kernel=false loss.w_free=1 "
                                 f"render.n_coarse=48 render.n_fine=48",
}
TRAIN_KEYS = ("depth_err_obj", "depth_err_bg", "fog_obj", "behind_obj", "opacity_mean")
HELD_KEYS = ("psnr_covis", "psnr_all", "canon_psnr", "depth_med_obj", "flat_med_obj", "depth_ratio_to_flat",
             "fog_obj", "opacity_front")


def train_summary(stats: Path) -> Dict[str, float]:
    """Median of the last quarter of the canonical steps' diagnostics in stats.jsonl."""
    recs = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    canon = [r for r in recs if r.get("branch") == "canon"]
    tail = canon[-max(1, len(canon) // 4):]
    out = {}
    for k in TRAIN_KEYS:
        vals = [r[k] for r in tail if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        out[k] = statistics.median(vals) if vals else float("nan")
    return out


def run_arm(name: str, overrides: str, args) -> Dict:
    """Train one arm (a subprocess) and score it; returns its row (also written to <work>/<name>/row.json)."""
    run = Path(args.work) / name
    cmd = [sys.executable, "-m", "g3dr", "train", "--config", args.preset, "--out", str(run), "--overwrite",
           "--quiet", "--max-steps", str(args.steps), "loss.allow_random_init=true", f"train.seed={args.seed}",
           f"train.device={args.device}", *overrides.split(), *args.extra.split()]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(Path(args.work) / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=max(1.0, args.deadline - (time.perf_counter() - START)))
        except subprocess.TimeoutExpired:  # out of time: the trainer saves on SIGTERM; score what it has
            proc.terminate()
            rc = proc.wait()
            rc = 0 if (run / "checkpoints" / "last.pt").is_file() else rc
    wall = time.perf_counter() - t0
    row: Dict = {"arm": name, "overrides": overrides, "steps": args.steps, "train_s": round(wall, 1), "rc": rc}
    if rc == 0:
        done = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines() if x.strip()]
        row["steps_done"] = done[-1]["step"] if done else 0
        from g3dr.heldout import score
        from g3dr.infer import load
        row["train"] = train_summary(run / "stats.jsonl")
        model = load(run, device=args.device)
        row["held_out"] = score(model, n_scenes=args.scenes)["mean"]
    (run / "row.json").write_text(json.dumps(row, indent=1)) if run.is_dir() else None
    return row


def markdown(rows: List[Dict], args) -> str:
    head = (f"| arm | train s | " + " | ".join(f"train {k}" for k in TRAIN_KEYS) + " | "
            + " | ".join(HELD_KEYS) + " |")
    lines = [head, "|" + "---|" * (2 + len(TRAIN_KEYS) + len(HELD_KEYS))]
    head = head.replace("| train s |", "| steps | train s |")
    lines[0], lines[1] = head, "|" + "---|" * (3 + len(TRAIN_KEYS) + len(HELD_KEYS))
    for r in rows:
        if r.get("rc"):
            lines.append(f"| {r['arm']} | failed (rc {r['rc']}) |")
            continue
        t, h = r["train"], r["held_out"]
        lines.append(f"| {r['arm']} | {r.get('steps_done', '')} | {r['train_s']:.0f} | " + " | ".join(f"{t[k]:.3f}" for k in TRAIN_KEYS) + " | "
                     + " | ".join(f"{h[k]:.3f}" for k in HELD_KEYS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=420)
    p.add_argument("--scenes", type=int, default=8, help="held-out scenes to score")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="arms trained side by side")
    p.add_argument("--arms", nargs="*", default=None, help="name=overrides ... (default: the built-in grid)")
    p.add_argument("--only", default="", help="comma-separated arm names of the built-in grid")
    p.add_argument("--extra", default="", help="overrides added to every arm")
    p.add_argument("--work", default="outputs/diagnose")
    p.add_argument("--deadline", type=float, default=float("inf"),
                   help="seconds from the start after which running arms are stopped (saved) and scored as they are")
    p.add_argument("--out", default="benchmarks/results/diagnosis.json")
    a = p.parse_args(argv)
    arms = dict(x.split("=", 1) for x in a.arms) if a.arms else dict(GRID)
    if a.only:
        arms = {k: arms[k] for k in a.only.split(",")}
    Path(a.work).mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor, as_completed
    import torch
    from g3dr.evaluate import machine_info
    report = {"machine": machine_info(), "device": a.device, "preset": a.preset, "steps": a.steps, "seed": a.seed,
              "held_out_scenes": a.scenes, "extra": a.extra, "rows": [], "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    if a.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    order = list(arms)
    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = [ex.submit(run_arm, k, v, a) for k, v in arms.items()]
        for f in as_completed(futs):  # the report is rewritten as arms finish: a cut-off run keeps what it has
            report["rows"].append(f.result())
            report["rows"].sort(key=lambda r: order.index(r["arm"]))
            out.write_text(json.dumps(report, indent=1))
    rows = report["rows"]
    table = markdown(rows, a)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
