"""Time per G3DR training step and peak memory: our fused renderer against the official rendering
path (benchmarks/official.py: grid_sample per level, PyTorch decoder, MipRayMarcher with an
autograd Function for the depth kernel), both inside the same model and loss, plus the share of
the step spent in the U-Net and in the renderer.

A step here is the canonical branch (target samples + depth-kernel scaling, recon + depth + opacity
losses; the frozen LPIPS/CLIP nets are left out: they are the same for both paths), forward,
backward and the Adam update. Sample placement is the same for both paths; only the final
(gradient-carrying) render differs.

Run: PYTHONPATH=$PWD python benchmarks/bench_train.py --preset small --batch 4
     (on a GPU: --preset official --batch 8 --device cuda; --batch 64 for the big-batch goal)
Results: appended to benchmarks/results/train.jsonl; benchmarks/results/train.md is rewritten.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import official  # noqa: E402
from benchmarks._harness import commit, env_note, machine, peak_memory_bytes  # noqa: E402
from g3dr import cameras  # noqa: E402
from g3dr.config import apply_overrides, preset  # noqa: E402
from g3dr.losses import depth_loss, recon_loss  # noqa: E402
from g3dr.model import G3DR  # noqa: E402
from g3dr_kernels import Composite  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def use_official_path(model: G3DR) -> None:
    """Route the model's gradient-carrying render through the official code path."""
    r = model.renderer

    def _render(planes, rays_o, rays_d, depths, params, target_depth=None, return_weights=False, **_):
        rgb, depth, opacity, weights = official.render(planes, rays_o, rays_d, depths, *params,
                                                       target_depth=target_depth, levels=r.levels,
                                                       box_warp=r.box_warp)
        return Composite(rgb, depth[..., 0], opacity[..., 0], weights[..., 0] if return_weights else None)

    r._render = _render


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(preset_name: str, batch: int, steps: int, device: str, impl: str) -> dict:
    dev = torch.device(device)
    cfg = apply_overrides(preset(preset_name), [f"train.batch_size={batch}", "loss.allow_random_init=true"])
    torch.manual_seed(0)
    model = G3DR(cfg).to(dev)
    if impl == "official":
        use_official_path(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    H = cfg.model.image_size
    img = torch.rand(batch, 3, H, H, device=dev)
    dep = 4.3 + 1.4 * torch.rand(batch, 1, H, H, device=dev)
    o, d = cameras.canonical_rays(cfg, batch, device=dev)
    target = dep.reshape(batch, -1)
    amp = dev.type == "cuda"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(img, dep, o, d, target_depth=target)
            rgb = out["rgb"].transpose(1, 2).reshape(batch, 3, H, H)
            depth = out["depth"].reshape(batch, 1, H, H)
            loss = recon_loss(rgb, img, "l1") + 2 * depth_loss(depth, dep, "l1") + (1 - out["opacity"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return None

    def unet_only():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            planes = model.planes(img, dep)
        planes.square().mean().backward()

    def render_only():
        planes = model.planes(img, dep).detach().requires_grad_()
        out = model.renderer(planes, o, d, target_depth=target)
        (out.rgb.square().mean() + out.depth.mean() + out.opacity.mean()).backward()

    def timed(fn, n):
        fn()  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(dev)
        return (time.perf_counter() - t0) / n

    t_step = timed(step, steps)
    t_unet = timed(unet_only, steps)
    t_render = timed(render_only, steps)
    peak = peak_memory_bytes(step, device)
    return {"bench": "train_step", "preset": preset_name, "batch": batch, "impl": impl, "device": device,
            "image": H, "samples": f"{cfg.render.n_coarse}+{cfg.render.n_fine}", "step_s": t_step,
            "unet_fwd_bwd_s": t_unet, "render_fwd_bwd_s": t_render, "peak_mib": peak / 2 ** 20,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}


def write_summary() -> None:
    rows = [json.loads(line) for line in open(RESULTS / "train.jsonl")]
    lines = ["# G3DR training step: fused renderer vs the official rendering path", "",
             "Canonical-branch step (target samples + depth-kernel scaling; recon, depth, opacity losses; Adam), "
             "same model and sample placement for both paths. U-Net and renderer columns are each measured alone "
             "(forward + backward). Generated by benchmarks/bench_train.py from train.jsonl.", "",
             "| date | commit | machine | preset | B | path | step | U-Net | renderer | peak memory | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['date'][:10]} | {r['commit'][:7]} | {r['machine']} | {r['preset']} ({r['image']}px, "
                     f"{r['samples']}) | {r['batch']} | {r['impl']} | {r['step_s']:.2f} s | {r['unet_fwd_bwd_s']:.2f} s |"
                     f" {r['render_fwd_bwd_s']:.2f} s | {r['peak_mib']:.0f} MiB | {r.get('note', '')} |")
    (RESULTS / "train.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--note", default="", help="free text stored with the rows (e.g. machine load)")
    p.add_argument("--impl", nargs="+", default=["fused", "official"], choices=["fused", "official"])
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for impl in args.impl:
        row = bench(args.preset, args.batch, args.steps, args.device, impl)
        row.pop("gpu")
        row.update(date=stamp, commit=commit(), machine=machine(), note=" ".join(x for x in (env_note(), args.note) if x))
        print(json.dumps(row))
        with open(RESULTS / "train.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    write_summary()
    print((RESULTS / "train.md").read_text())


if __name__ == "__main__":
    main()
