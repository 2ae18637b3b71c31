"""A built-in procedural triplane scene (a banded planet with a ring) for the demo and smoke
tests: planes and decoder weights written in closed form, no training, no downloads.

Each scalar field is a sum of per-plane terms, which a triplane represents exactly:
  channel 0: r^2 = (x^2 + y^2) [plane xy] + z^2 [plane xz]            -> sphere density
  channel 1: y^2 [plane xy] + (sqrt(x^2 + z^2) - R)^2 [plane xz]         -> torus (ring) density
  channels 2-4: colour patterns (latitude bands, longitude wedges, ring stripes)
Features are the mean over planes of the sum over levels, so fields come out scaled by levels/3;
the decoder undoes that.
"""
from __future__ import annotations

import math

import torch

from g3dr_kernels.nn import TriplaneDecoder

SPHERE_R, RING_R, RING_W = 0.42, 0.7, 0.1


def demo_planes(resolution: int = 96, channels: int = 8) -> torch.Tensor:
    """[1, 3, C, H, W] in EG3D plane order (planes read (x,y), (x,z), (z,x)); box_warp = 2."""
    if channels < 5:
        raise ValueError(f"the demo scene needs >= 5 channels, got {channels}")
    n = resolution
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    b, a = torch.meshgrid(c, c, indexing="ij")  # a indexes width, b height
    P = torch.zeros(3, channels, n, n)
    # plane 0 = (x, y), plane 1 = (x, z), plane 2 = (z, x)
    P[0, 0] = a ** 2 + b ** 2
    P[1, 0] = b ** 2
    P[0, 1] = b ** 2
    P[1, 1] = (torch.sqrt(a ** 2 + b ** 2) - RING_R) ** 2
    P[0, 2] = torch.sin(9 * b)                      # latitude bands
    P[1, 3] = torch.cos(7 * torch.atan2(b, a))       # longitude wedges
    P[1, 4] = torch.sin(40 * torch.sqrt(a ** 2 + b ** 2))  # ring stripes
    P[2, 2] = 0.3 * torch.cos(5 * a)
    return P.unsqueeze(0)


def demo_decoder(channels: int = 8, hidden: int = 16, levels: int = 3) -> TriplaneDecoder:
    """Decoder with hand-set weights for demo_planes (EG3D conventions, lr_multiplier 1)."""
    dec = TriplaneDecoder(channels, hidden, 3)
    s = 3.0 / levels  # undo mean over planes and sum over levels
    w1 = torch.zeros(hidden, channels)
    b1 = torch.zeros(hidden)
    w2 = torch.zeros(4, hidden)
    b2 = torch.zeros(4)
    # Steep ramps so the density rises from ~0 to ~20 over a few hundredths of a unit at the surface.
    w1[0, 0], b1[0] = -400.0 * s, 400.0 * SPHERE_R ** 2        # > 0 inside the sphere
    w1[1, 1], b1[1] = -2000.0 * s, 2000.0 * RING_W ** 2        # > 0 inside the ring
    w2[0, 0], w2[0, 1], b2[0] = 1.0, 1.0, -7.0                  # raw density; ~0 outside
    for i, ch in enumerate((2, 3, 4)):                           # colour features, shifted positive
        w1[2 + i, ch], b1[2 + i] = 1.5 * s, 2.0
    # sphere: warm bands + cool wedges; ring (unit 1 active) pushes towards pale gold
    w2[1:, 2] = torch.tensor([1.6, 0.6, -0.8])
    w2[1:, 3] = torch.tensor([-0.5, 0.5, 1.4])
    w2[1:, 4] = torch.tensor([0.5, 0.4, 0.1])
    w2[1:, 1] = torch.tensor([0.08, 0.06, 0.0])
    b2[1:] = torch.tensor([-2.6, -2.0, -1.4])
    with torch.no_grad():
        g = dec.lr_multiplier
        dec.weight1.copy_(w1 * math.sqrt(channels) / g)
        dec.bias1.copy_(b1 / g)
        dec.weight2.copy_(w2 * math.sqrt(hidden) / g)
        dec.bias2.copy_(b2 / g)
    return dec
