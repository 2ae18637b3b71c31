"""The cpu fused render's achieved GFLOP/s next to a rough CPU roofline.

Work counted per sample, fwd+bwd (multiply-add = 2 FLOP; softplus, compositing and index math not
counted), with T = 12 * levels bilinear taps (3 planes x 4 corners per level), C channels, Hd hidden, O = 1 + D:
  forward        gather 2 T C + decoder 2 C Hd + 2 Hd O
  backward       the forward again (recompute) + dL/df 2 O Hd + 2 Hd C + weight gradients 2 Hd C + 2 O Hd
                 + scatter 2 T C
Bytes per sample: the taps' channel rows read three times (gather, recompute, scatter) and written
once (scatter): 4 T C x 4 bytes; the plane pyramid and its gradient (2 x 16.5 MB per batch element at
the G3DR size) are bigger than L2 but fit a large L3, so these are cache-line reads at random places.
Roofline = min(peak, intensity x bandwidth), with both measured here on the same threads:
  peak       float32 GEMM (torch.mm, MKL) of 1024^3, the best a dense kernel gets on these cores
  bandwidth  a copy of a 256 MiB tensor (read + write bytes): streaming memory bandwidth. (A random
             texel row costs at least as much as streaming it, so this roof is optimistic for the
             memory side; a copy of an L3-sized tensor measured lower, not higher, on the shared VM.)
Also printed: achieved / GEMM peak, the compute-side distance.
The render runs at the G3DR size per batch element (C=64, 128x128, 3 levels, R=16,384, S=64,
hidden 64, D=3, target, weights in the loss) with B=1: per-sample work is the same as at B=8.

The rays are those of one camera aimed at random points of the box, in random order (the kernel
sorts them by position; an image's rays in row-major order run at the same speed, measured).
With a second argument B the render runs B batch elements (B=2 is the size of the earlier measurement: "4.3 s
for B=2 against a rough roofline of ~0.5 s", i.e. 73 GFLOP at ~160 GFLOP/s), and the row also gives
the time against that quoted roofline.

Run: PYTHONPATH=$PWD python benchmarks/roofline_render_cpu.py [reps] [B]   (prints one Markdown table row)
"""
from __future__ import annotations

import math
import statistics
import sys
import time

import torch

import g3dr_kernels as K
from g3dr_kernels import sampling


def flops_bytes_per_sample(C: int, Hd: int, O: int, levels: int) -> tuple[float, float]:
    T = 12 * levels
    fwd = 2 * T * C + 2 * C * Hd + 2 * Hd * O
    bwd = fwd + 2 * O * Hd + 2 * Hd * C + 2 * Hd * C + 2 * O * Hd + 2 * T * C
    return float(fwd + bwd), float(4 * T * C * 4)


def best(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


ISSUE_ROOFLINE_S_B2 = 0.5  # the rough roofline for B=2 at the G3DR size


def main(reps: int = 3, B: int = 1) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    peak = 2 * 1024**3 / best(lambda: torch.mm(a, b), 5) / 1e9
    x = torch.ones(64 * 2**20)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / best(lambda: y.copy_(x), 5) / 1e9
    del x, y

    C, H, R, S, Hd, D, L = 64, 128, 16384, 64, 64, 3, 3
    planes = (0.5 * torch.randn(B, 3, C, H, H)).requires_grad_(True)
    cam = torch.nn.functional.normalize(torch.randn(B, 1, 3), dim=-1) * 2.7
    rays_o = cam.expand(B, R, 3).contiguous()
    rays_d = torch.nn.functional.normalize(0.6 * (torch.rand(B, R, 3) - 0.5) - rays_o, dim=-1)
    near, far, _ = sampling.ray_box_bounds(rays_o, rays_d, 2.0)
    depths = sampling.stratified_depths(near, far, S)
    target = near + 0.5 * (far - near)
    dec = [(torch.randn(Hd, C) / math.sqrt(C)).requires_grad_(True), torch.zeros(Hd, requires_grad=True),
           (torch.randn(1 + D, Hd) / math.sqrt(Hd)).requires_grad_(True), torch.zeros(1 + D, requires_grad=True)]

    def step():
        out = K.render_triplanes(planes, rays_o, rays_d, depths, *dec, target_depth=target, levels=L, backend="cpu")
        (out.rgb.sum() + out.depth.sum() + out.opacity.sum() + out.weights.sum()).backward()

    t = best(step, reps)
    fl, by = flops_bytes_per_sample(C, Hd, 1 + D, L)
    n = B * R * S
    got = n * fl / t / 1e9
    roof = min(peak, fl / by * bw)
    quoted = f"{t / (ISSUE_ROOFLINE_S_B2 * B / 2):.1f}x"
    print(f"| threads | GEMM peak GFLOP/s | copy GB/s | FLOP/byte | roofline GFLOP/s | fwd+bwd s (B={B}) | "
          "achieved GFLOP/s | roofline / achieved | GEMM peak / achieved | time / issue's roofline |")
    print(f"| {torch.get_num_threads()} | {peak:.0f} | {bw:.1f} | {fl / by:.2f} | {roof:.0f} | {t:.2f} | {got:.1f} | "
          f"{roof / got:.1f}x | {peak / got:.1f}x | {quoted} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
