"""The depth-kernel ablation (G3DR Table 4 / Table S1) on synthetic scenes with ground truth:
`g3dr eval --ablation` and benchmarks/fidelity.py. It lives in the package rather than in benchmarks/
because the `g3dr` command runs it, and an installed g3dr does not ship benchmarks/.

One model per arm and seed (`ABLATION_VARIANTS`: "kernel", "no_kernel", "no_depth"), trained on the
same scenes with the same budget; each scored with `g3dr.evaluate.evaluate` (novel views, NFS, depth
accuracy, geometry, sigma scaling) and with `g3dr.heldout.score` (object and background pixels apart,
fog). The report gives the mean and spread over seeds per arm, and says whether the paper's claim
(depth accuracy and NFS better with the kernel) shows at this budget.
"""
from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .config import apply_overrides, preset
from .evaluate import evaluate, format_number, machine_info, sigma_key
from .files import atomic_write, write_bytes, write_json
from .heldout import score
from .infer import load
from .losses import vgg16_file
from .train import train


ABLATION_VARIANTS = {
    "kernel": ["render.depth_kernel=true"],        # G3DR: depth-kernel gradient scaling on canonical views
    "no_kernel": ["render.depth_kernel=false"],    # the ablation: target samples kept, no gradient rescaled
    # no depth supervision at all (kernel on): neither the depth loss nor the terms that read the input depth
    "no_depth": ["loss.w_depth=0", "loss.w_free=0", "loss.w_carve=0", "loss.novel_opacity=all"],
}
# (metric, label, higher is better)
_ABLATION_METRICS = [("psnr", "PSNR novel (dB)", True), ("ssim", "SSIM novel", True), ("lpips", "LPIPS novel", False),
                     ("depth_abs_mean", "depth abs err mean (novel)", False),
                     ("depth_abs_median", "depth abs err median (novel)", False),
                     ("psnr_canonical", "PSNR canonical (dB)", True),
                     ("depth_abs_mean_canonical", "depth abs err mean (canonical)", False),
                     ("depth_accuracy_canonical", "depth accuracy canonical", False),
                     ("depth_accuracy_novel", "depth accuracy novel", False), ("nfs_canonical", "NFS canonical", True),
                     ("nfs_novel", "NFS novel", True), ("iou", "IoU", True), ("chamfer", "Chamfer-L1", False),
                     ("fscore", "F-score @0.05", True)]


def ablation_overrides(steps: int, scenes: int, batch: int, seed: int = 420, lr: Optional[float] = None,
                       notes: Optional[Dict[str, str]] = None) -> List[str]:
    """The config overrides every ablation model shares (on top of the preset): budget, data, seed,
    learning rate (None: the preset's), checkpoint/image only at the end.
    Without local VGG16 weights LPIPS is switched off in training (a random VGG would only add noise)."""
    for name, v in (("steps", steps), ("scenes", scenes), ("batch", batch)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"ablation: {name} must be an integer >= 1, got {v!r}")
    over = [f"train.steps={steps}", f"train.batch_size={batch}", f"data.synthetic_scenes={scenes}",
            f"train.seed={seed}", f"train.save_every={steps}", f"train.image_every={steps}", "train.log_every=1"]
    over += [f"schedule.lr={lr}"] if lr is not None else []
    if vgg16_file("") is None:
        over += ["loss.w_lpips_canon=0", "loss.w_lpips_novel=0"]
        if notes is not None:
            notes["train_lpips"] = "no VGG16 weights on this machine: trained without the LPIPS terms"
    return over


def ablation(out_dir: Union[str, Path] = "benchmarks/results", work_dir: Union[str, Path] = "outputs/fidelity", *,
             steps: int = 60, scenes: int = 16, batch: int = 2, variants: Sequence[str] = ("kernel", "no_kernel"),
             preset_name: str = "fast", seed: int = 420, seeds: Optional[Sequence[int]] = None,
             lr: Optional[float] = None, eval_scenes: int = 4,
             yaw_offsets: Sequence[float] = (-0.4, -0.2, 0.0, 0.2, 0.4), pitch_offsets: Sequence[float] = (0.0, 0.15),
             sigma_scales: Sequence[float] = (1, 5, 10, 50), name: str = "fidelity", overrides: Sequence[str] = (),
             device: Optional[str] = None, progress: bool = True, **eval_kw) -> Dict:
    """Train one model per variant (`ABLATION_VARIANTS`) and seed (`seeds`, default just `seed`) on the same
    synthetic scenes and budget (`steps` x `batch` images, `scenes` training scenes) into
    work_dir/runs/<variant> (one seed) or <variant>-s<seed>; an existing finished run is reused (resume).
    Each model is scored with `evaluate` and `heldout.score` on held-out scenes. Writes out_dir/<name>.json,
    <name>.md (mean and spread per arm, the verdict, the first seed's detail) and <name>.png (metrics vs
    yaw and vs sigma scale) and <name>_seeds.png (mean and spread per arm). Returns the report."""
    bad = [v for v in variants if v not in ABLATION_VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown ablation variants {bad or list(variants)}; choose from "
                         f"{', '.join(ABLATION_VARIANTS)}")
    seeds = tuple(seeds) if seeds else (seed,)
    out_dir, work = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: Dict[str, str] = {}
    base = ablation_overrides(steps, scenes, batch, seed, lr, notes)
    if device:
        base.append(f"train.device={device}")
    report = {"meta": dict(preset=preset_name, steps=steps, scenes=scenes, batch=batch, seed=seed, seeds=list(seeds),
                           lr=lr, eval_scenes=eval_scenes, overrides=base + list(overrides), **machine_info()),
              "notes": notes, "train": {}, "variants": {}, "seeds": {}}
    kw = dict(n_scenes=eval_scenes, yaw_offsets=yaw_offsets, pitch_offsets=pitch_offsets,
              sigma_scales=sigma_scales, **eval_kw)
    for v in variants:
        report["seeds"][v] = {}
        for sd in seeds:
            cfg = apply_overrides(preset(preset_name), base + ABLATION_VARIANTS[v] + list(overrides)
                                  + [f"train.seed={sd}"])
            run = work / "runs" / (v if len(seeds) == 1 else f"{v}-s{sd}")
            t0 = time.perf_counter()
            summary = train(cfg, run, resume="auto", progress=progress)
            report["train"][v if len(seeds) == 1 else f"{v}-s{sd}"] = dict(
                run=str(run), step=summary["step"], seconds=_train_seconds(run, batch),
                call_seconds=time.perf_counter() - t0, losses=summary["losses"], overrides=ABLATION_VARIANTS[v])
            old = _reusable_eval(run, kw)
            ev = old if old is not None else evaluate(run, "synthetic", out=run, device=device, progress=progress, **kw)
            if sd == seeds[0]:
                report["variants"][v] = ev
            held = score(load(run, device=device), n_scenes=eval_scenes)["mean"]
            report["seeds"][v][str(sd)] = {"metrics": ev["metrics"], "heldout": held,
                                           "sigma_scaling": ev.get("sigma_scaling", {})}
    report["summary"] = summarize(report)
    report["verdict"] = verdict(report)
    write_json(out_dir / f"{name}.json", report, allow_nan=True)
    write_bytes(out_dir / f"{name}.md", ablation_markdown(report))
    plot_ablation(report, out_dir / f"{name}.png")
    plot_seeds(report, out_dir / f"{name}_seeds.png")
    return report


# held-out numbers (g3dr.heldout) summarised per arm: (key, label, higher is better)
_HELDOUT_METRICS = [("psnr_covis", "held-out PSNR co-visible (dB)", True), ("psnr_all", "held-out PSNR all (dB)", True),
                    ("depth_med_obj", "held-out object depth err (median)", False),
                    ("depth_med_bg", "held-out background depth err (median)", False),
                    ("fog_obj", "held-out fog (object px > 0.1 in front)", False),
                    ("opacity_front", "held-out opacity in front of objects", False)]


def _stats(vals: List[float]) -> Dict[str, float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def summarize(report: Dict) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per arm and metric: mean, spread (population std) and count over the seeds."""
    out = {}
    for v, per_seed in report["seeds"].items():
        out[v] = {}
        for k, _, _ in _ABLATION_METRICS:
            out[v][k] = _stats([r["metrics"].get(k) for r in per_seed.values()])
        for k, _, _ in _HELDOUT_METRICS:
            out[v]["heldout_" + k] = _stats([r["heldout"].get(k) for r in per_seed.values()])
    return out


# the paper's claim (Table 4): with the kernel, depth accuracy lower and NFS higher than without
# (metric, higher is better, a claim of the paper's)
_CLAIMS = [("depth_accuracy_canonical", False, True), ("nfs_canonical", True, True),
           ("heldout_depth_med_obj", False, False), ("heldout_depth_med_bg", False, False),
           ("heldout_fog_obj", False, False)]


def verdict(report: Dict) -> List[str]:
    """One line per claim metric: kernel vs no_kernel, the difference against the spread over seeds."""
    sm = report.get("summary", {})
    if "kernel" not in sm or "no_kernel" not in sm:
        return ["kernel and no_kernel arms are both needed for a verdict"]
    lines = []
    for k, higher, paper in _CLAIMS:
        a, b = sm["kernel"].get(k), sm["no_kernel"].get(k)
        if not a or not b or a["n"] == 0 or b["n"] == 0:
            continue
        diff = a["mean"] - b["mean"]
        spread = a["std"] + b["std"]
        better = diff > 0 if higher else diff < 0
        if abs(diff) <= spread or diff == 0:
            word = "no clear difference"
        else:
            word = "kernel better" if better else "kernel worse"
            word += (" (as the paper claims)" if better else " (against the paper's claim)") if paper else ""
        lines.append(f"{k}: kernel {a['mean']:.4g} +- {a['std']:.2g} vs no kernel {b['mean']:.4g} +- {b['std']:.2g} "
                     f"({'higher' if higher else 'lower'} is better): {word}")
    return lines


def _train_seconds(run: Path, batch: int) -> float:
    """Training time of a run from its stats.jsonl (log_every=1: batch / img_per_s per step), so a
    reused finished run still reports how long it took."""
    stats = run / "stats.jsonl"
    rows = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()] if stats.is_file() else []
    return float(sum(batch / r["img_per_s"] for r in rows if r.get("img_per_s", 0) > 0))


def _reusable_eval(run: Path, kw: Dict) -> Optional[Dict]:
    """run/eval.json when it is newer than the run's last checkpoint and was made with the same
    evaluation arguments (so a rerun of a finished ablation only rebuilds the report), else None."""
    ev, ck = run / "eval.json", run / "checkpoints" / "last.pt"
    if not (ev.is_file() and ck.is_file() and ev.stat().st_mtime > ck.stat().st_mtime):
        return None
    try:
        old = json.loads(ev.read_text())
    except ValueError:
        return None
    full = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in ("data", "out", "device", "progress")}
    full.update(kw)
    return old if old.get("meta", {}).get("eval_args") == json.loads(json.dumps(full, default=str)) else None


def ablation_markdown(report: Dict) -> str:
    """The ablation report as Markdown: setup, metrics per model (best marked), sigma scaling."""
    m, vs = report["meta"], report["variants"]
    names = list(vs)
    lines = ["# Depth-kernel ablation (fidelity benchmark)", "",
             f"{m['preset']} preset, {m['steps']} steps x batch {m['batch']} on {m['scenes']} synthetic training "
             f"scenes, seeds {m.get('seeds') or [m['seed']]}, lr {m['lr'] or 'of the preset'}; evaluated on "
             f"{m['eval_scenes']} held-out scenes. "
             f"Machine: {m['machine']}; torch {m['torch']}; commit {m['commit']}; {m['date']}.", "",
             "Training time: " + ", ".join(f"{v} {t['seconds'] / 60:.1f} min ({t['step']} steps)"
                                          for v, t in report["train"].items()) + ".", "",
             f"Budget: {m['steps'] * m['batch']:,} training images per model (the paper: 400k steps x 64 = 25.6M), so "
             "the differences say how fast each variant learns at this budget, not where it converges.", "",
             "Paper (G3DR Table 4, ImageNet, full training): depth accuracy 0.39 with the kernel vs 1.38 without "
             "(lower is better); NFS 36.5 vs 25.5 (higher is better). Depth accuracy on novel views also scores "
             "the rays that miss the scene (true depth = the far bound), so it is noisier than on the canonical "
             "view.", "",
             ]
    sm = report.get("summary") or {}
    if sm:
        arms = list(sm)
        nseeds = len(m.get("seeds") or [m["seed"]])
        lines += [f"## Mean +- spread over {nseeds} seed(s) ({', '.join(str(x) for x in m.get('seeds') or [m['seed']])})",
                  "", "| metric | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        rows = [(k, label, up) for k, label, up in _ABLATION_METRICS] + \
               [("heldout_" + k, label, up) for k, label, up in _HELDOUT_METRICS]
        for k, label, up in rows:
            cells = [sm[a].get(k) for a in arms]
            if all(c is None or c["n"] == 0 for c in cells):
                continue
            lines.append(f"| {label} ({'higher' if up else 'lower'} better) | "
                         + " | ".join("-" if c is None or c["n"] == 0 else f"{c['mean']:.4g} +- {c['std']:.2g}"
                                      for c in cells) + " |")
        lines += ["", "Verdict (kernel vs no kernel; a difference within the summed spreads counts as none):", ""]
        lines += [f"- {x}" for x in report.get("verdict") or []]
        lines += ["", f"## Detail: seed {m['seed']}", ""]
    lines += ["| metric | " + " | ".join(names) + " | best |", "|---" * (len(names) + 2) + "|"]
    for k, label, higher in _ABLATION_METRICS:
        vals = [vs[n]["metrics"].get(k) for n in names]
        if all(v is None for v in vals):
            continue
        ok = [(v, n) for v, n in zip(vals, names) if v is not None and not math.isnan(v)]
        best = "" if len(ok) < 2 else "tie" if len({v for v, _ in ok}) == 1 else \
            (max(ok) if higher else min(ok))[1]
        lines.append(f"| {label} {'(higher better)' if higher else '(lower better)'} | "
                     + " | ".join(format_number(v) for v in vals) + f" | {best} |")
    ss_keys = [("psnr", "PSNR novel"), ("depth_abs_mean", "depth abs err mean"),
               ("depth_accuracy_canonical", "depth accuracy canonical"), ("nfs_canonical", "NFS canonical"),
               ("iou", "IoU"), ("chamfer", "Chamfer-L1")]
    first = vs[names[0]]["sigma_scaling"]
    if len(first) > 1:
        lines += ["", "## Sigma scaling (Table S1): density multiplied by s", "",
                  "| metric | s | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for k, label in ss_keys:
            for s in first:
                vals = [vs[n]["sigma_scaling"].get(s, {}).get(k) for n in names]
                if all(v is None for v in vals):
                    continue
                lines.append(f"| {label} | {s} | " + " | ".join(format_number(v) for v in vals) + " |")
    allnotes = dict(report.get("notes") or {})
    for n in names:
        for k, v in (vs[n].get("notes") or {}).items():
            allnotes.setdefault(k, v)
    if allnotes:
        lines += ["", "Notes:"] + [f"- {k}: {v}" for k, v in allnotes.items()]
    lines += ["", f"Views: canonical + yaw offsets x pitch offsets {vs[names[0]]['meta']['views']} (radians); "
                  f"NFS bounds {vs[names[0]]['meta']['nfs_bounds']}; geometry grid "
                  f"{vs[names[0]]['meta']['geometry_resolution']}^3, iso {vs[names[0]]['meta']['iso']}."]
    return "\n".join(lines) + "\n"


def plot_ablation(report: Dict, path: Union[str, Path]) -> Path:
    """Metrics vs yaw offset (pitch 0 views) and vs sigma scale, one line per model (matplotlib, Agg)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"the ablation plot needs matplotlib: pip install 'g3dr[eval]' ({e}); the .json and .md "
                          f"reports are written already") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vs = report["variants"]
    yaw_keys = [("psnr", "PSNR (dB)"), ("depth_abs_mean", "depth abs err"), ("nfs", "NFS"),
                ("depth_accuracy", "depth accuracy")]
    s_keys = [("psnr", "PSNR novel (dB)"), ("depth_abs_mean", "depth abs err (novel)"),
              ("nfs_canonical", "NFS canonical"), ("depth_accuracy_canonical", "depth accuracy canonical")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for n, res in vs.items():
        pv = sorted((v for v in res["per_view"] if v["pitch"] == 0.0), key=lambda v: v["yaw"])
        for ax, (k, label) in zip(axes[0], yaw_keys):
            if pv and k in pv[0]:
                ax.plot([v["yaw"] for v in pv], [v[k] for v in pv], "o-", label=n)
            ax.set(xlabel="yaw offset (rad), pitch 0", title=label)
        ss = res["sigma_scaling"]
        xs = sorted(float(s) for s in ss)
        for ax, (k, label) in zip(axes[1], s_keys):
            ys = [ss[sigma_key(s)].get(k) for s in xs]
            if any(y is not None for y in ys):
                ax.plot(xs, [math.nan if y is None else y for y in ys], "o-", label=n)
            ax.set(xscale="log", xlabel="sigma scale s", title=label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = report["meta"]
    fig.suptitle(f"depth-kernel ablation: {m['preset']} preset, {m['steps']} steps x batch {m['batch']}, "
                 f"{m['scenes']} scenes; {m['eval_scenes']} held-out scenes")
    return _save_figure(fig, path)


def _save_figure(fig, path: Union[str, Path]) -> Path:
    """Write a matplotlib figure as PNG atomically (temp name, then rename) and close it."""
    import matplotlib.pyplot as plt  # optional (g3dr[eval]); its caller has checked that it is there
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


def plot_seeds(report: Dict, path: Union[str, Path]) -> Optional[Path]:
    """Bars of the mean per arm with the spread over seeds as error bars, for the claim metrics and the
    held-out object/background numbers (matplotlib, Agg). None without matplotlib or a summary."""
    sm = report.get("summary")
    if not sm:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("depth_accuracy_canonical", "depth accuracy (canonical), lower better"),
            ("nfs_canonical", "NFS (canonical), higher better"),
            ("heldout_depth_med_obj", "object depth err, lower better"),
            ("heldout_depth_med_bg", "background depth err, lower better"),
            ("heldout_fog_obj", "fog, lower better"), ("heldout_psnr_covis", "PSNR co-visible, higher better")]
    arms = list(sm)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    for ax, (k, title) in zip(axes, keys):
        means = [sm[a][k]["mean"] if k in sm[a] else math.nan for a in arms]
        stds = [sm[a][k]["std"] if k in sm[a] else 0 for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color=["C0", "C1", "C2", "C3"][:len(arms)])
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    m = report["meta"]
    fig.suptitle(f"depth-kernel ablation, mean +- spread over seeds {m.get('seeds')}: {m['preset']}, {m['steps']} "
                 f"steps x batch {m['batch']}", fontsize=9)
    return _save_figure(fig, path)
