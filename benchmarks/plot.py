"""Bar chart of benchmarks/results/results.jsonl (newest row per impl): speed-up and peak-memory
reduction of each backend against the official baseline, one panel per (op, config, mode, machine).
Writes benchmarks/results/summary.png. Needs matplotlib (pip install g3dr[bench])."""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(only_mode: str = "fwd+bwd") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(RESULTS / "results.jsonl") if line.strip()]
    latest = {}
    for r in rows:
        latest[(r["op"], r["config"], r["mode"], r["machine"], r["impl"])] = r
    groups = {}
    for (op, cfg, mode, mach, impl), r in latest.items():
        if mode == only_mode:
            groups.setdefault((op, cfg, mode, mach), {})[impl] = r
    groups = {k: v for k, v in groups.items() if "baseline" in v and len(v) > 1}
    if not groups:
        raise SystemExit("no results with a baseline to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 2.4 * len(groups)), squeeze=False)
    for row, (key, impls) in enumerate(sorted(groups.items())):
        base = impls["baseline"]
        names = [i for i in sorted(impls) if i != "baseline"]
        speed = [base["median_s"] / impls[i]["median_s"] for i in names]
        mem = [base["peak_mem_bytes"] / max(impls[i]["peak_mem_bytes"], 1) for i in names]
        for ax, vals, label in ((axes[row, 0], speed, "speed-up vs baseline"), (axes[row, 1], mem, "peak-memory reduction")):
            bars = ax.barh(names, vals, color="#4a7fb5")
            ax.axvline(1.0, color="k", lw=0.8)
            ax.bar_label(bars, labels=[f"{v:.1f}x" for v in vals], fontsize=8)
            ax.set_title(f"{key[0]} {key[1]} ({key[2]}): {label}", fontsize=8)
            ax.tick_params(labelsize=8)
        axes[row, 0].set_ylabel(key[3][:28], fontsize=7)
    fig.tight_layout()
    out = RESULTS / "summary.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
