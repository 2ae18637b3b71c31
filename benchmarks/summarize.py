"""Turns benchmarks/results/results.jsonl into summary.md: for each (op, config, mode, machine), the
newest row of every impl, with time and peak memory against the baseline."""
import json
from pathlib import Path


def write_summary(results_dir: Path) -> Path:
    rows = [json.loads(line) for line in open(results_dir / "results.jsonl") if line.strip()]
    latest = {}
    for r in rows:
        latest[(r["op"], r["config"], r["mode"], r["machine"], r["impl"])] = r
    groups = {}
    for (op, cfg, mode, mach, impl), r in latest.items():
        groups.setdefault((op, cfg, mode, mach), {})[impl] = r
    lines = ["# Benchmark summary", "", "Generated from results.jsonl (newest row per impl). Speed-up and memory "
             "ratio are baseline / impl (higher is better).", "",
             "| op | config | mode | machine | impl | median ms | peak MiB | speed-up | mem ratio | commit | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups):
        impls = groups[key]
        base = impls.get("baseline")
        for impl in sorted(impls, key=lambda i: (i != "baseline", i)):
            r = impls[impl]
            sp = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
            mr = f"{base['peak_mem_bytes'] / max(r['peak_mem_bytes'], 1):.1f}x" if base else "-"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {impl} | {r['median_s'] * 1e3:.1f} | "
                         f"{r['peak_mem_bytes'] / 2**20:.1f} | {sp} | {mr} | {r.get('commit', '')} | "
                         f"{r.get('date', '')[:10]} |")
    out = results_dir / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    print(write_summary(Path(__file__).resolve().parent / "results").read_text())
