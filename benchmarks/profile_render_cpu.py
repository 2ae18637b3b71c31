"""Where the cpu fused render's time goes at the render benchmark config (B=2, C=32, 64x64, 3 levels,
R=4096, S=48, hidden 64, D=3, target, every output in the loss): forward alone, forward+backward, and
the same with a tiny decoder (hidden 8) to estimate the decoder's share; LEVELS=1 in the environment
samples the finest level only (the multi-level gathers' share). Median of `reps` runs.

Run: PYTHONPATH=$PWD python benchmarks/profile_render_cpu.py [reps]. Results: benchmarks/results/
profile_render_cpu.md. A rough split by ablation, not a profiler: timings on a shared machine are noisy."""
import statistics, sys, time, math
import torch, g3dr_kernels as K
import g3dr_kernels.sampling  # noqa: F401 (K.sampling)
torch.manual_seed(0)
import os
B, C, H, R, S, D = 2, 32, 64, 4096, 48, 3
LEVELS = int(os.environ.get("LEVELS", "3"))
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
planes = torch.randn(B, 3, C, H, H) * 0.5
eye = torch.nn.functional.normalize(torch.randn(B, 1, 3), dim=-1) * 2.7
ro = (eye + 0.05 * torch.randn(B, R, 3)).contiguous()
rd = torch.nn.functional.normalize(0.8 * (torch.rand(B, R, 3) - 0.5) - ro, dim=-1)
near, far, hit = K.sampling.ray_box_bounds(ro, rd, 2.0)
dz = K.sampling.stratified_depths(near, far, S)
tgt = 0.5 * (near + far)
def run(hidden, bwd):
    w1 = (torch.randn(hidden, C) / math.sqrt(C)).requires_grad_(bwd); b1 = torch.zeros(hidden).requires_grad_(bwd)
    w2 = (torch.randn(1 + D, hidden) / math.sqrt(hidden)).requires_grad_(bwd); b2 = torch.zeros(1 + D).requires_grad_(bwd)
    p = planes.clone().requires_grad_(bwd)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = K.render_triplanes(p, ro, rd, dz, w1, b1, w2, b2, target_depth=tgt, levels=LEVELS, backend="cpu")
        if bwd:
            (out.rgb.sum() + out.depth.sum() + out.opacity.sum() + out.weights.sum()).backward()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
print(f"threads {torch.get_num_threads()}")
for hidden in (64, 8):
    f = run(hidden, False); fb = run(hidden, True)
    # decoder FLOPs per sample: fwd 2*C*hid + 2*hid*(1+D); bwd recompute fwd + 2x (input grad + weight grads)
    n = B * R * S
    fl_f = n * (2 * C * hidden + 2 * hidden * (1 + D))
    print(f"hidden {hidden}: fwd {f*1e3:.0f} ms, fwd+bwd {fb*1e3:.0f} ms, bwd {1e3*(fb-f):.0f} ms; "
          f"decoder fwd {fl_f/1e9:.2f} GFLOP -> {fl_f/f/1e9:.1f} GFLOP/s in the fwd; fwd+bwd decoder ~{4*fl_f/1e9:.2f} GFLOP "
          f"-> {4*fl_f/fb/1e9:.1f} GFLOP/s")
