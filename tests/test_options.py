"""Every option of every public op, one at a time (and all together), on every compiled/Triton backend
against the reference: values and every gradient. The parity tests elsewhere run mostly at the
default options, so a backend that ignored `box_warp`, `plane_axes`, `eps`, `density_bias`, a kernel
constant or `white_background` (or a public function that did not pass one on) passed them; here each
case is first checked to change the reference's result (`_assert_option_matters`), so the comparison
can catch a backend that drops it.

Everything runs in float64 (the CPU kernels and the Triton kernels under the interpreter both compute
in float64 then), so the tolerance only covers summation order: rtol 1e-9, atol 1e-11.
"""
from __future__ import annotations

import math

import pytest
import torch

import g3dr_kernels as gk
from g3dr_kernels import DepthKernel
from _util import backend_params, grads

TOL = dict(rtol=1e-9, atol=1e-11)
F64 = torch.float64
CUSTOM_KERNEL = DepthKernel(s1=2.0, s2=0.2, c_min=0.1, c_max=1.5)


def _compare(fn, inputs: dict, wrt: tuple, backend: str, device: str, **options):
    """fn(**inputs, **options, backend=b) on `backend` and on "torch": outputs and gradients equal."""
    res = {}
    for b, dev in ((backend, device), ("torch", "cpu")):
        ins = {k: (v.detach().to(dev).requires_grad_(k in wrt) if isinstance(v, torch.Tensor) else
                   [p.detach().to(dev).requires_grad_(True) for p in v] if isinstance(v, list) else v)
               for k, v in inputs.items()}
        out = fn(**ins, **options, backend=b)
        outs = list(out) if isinstance(out, tuple) else [out]
        leaves = {}
        for k in wrt:
            if isinstance(ins[k], list):
                leaves.update({f"{k}[{i}]": p for i, p in enumerate(ins[k])})
            else:
                leaves[k] = ins[k]
        res[b] = ([o for o in outs if o is not None], grads(outs, leaves))
    (got, ggot), (want, gwant) = res[backend], res["torch"]
    assert len(got) == len(want)
    for i, (x, y) in enumerate(zip(got, want)):
        torch.testing.assert_close(x.cpu(), y, **TOL, msg=lambda m: f"output {i} with {options}: {m}")
    for k in gwant:
        torch.testing.assert_close(ggot[k].cpu(), gwant[k], **TOL, msg=lambda m: f"grad {k} with {options}: {m}")
    return want, gwant


def _assert_option_matters(fn, inputs: dict, wrt: tuple, options: dict, base: dict) -> None:
    """The reference with `options` differs from the reference with `base` (the case's defaults), in
    values or gradients, so a backend that ignored the options would fail the comparison."""
    if options == base:
        return
    runs = []
    for opts in (options, base):
        ins = {k: (v.detach().clone().requires_grad_(k in wrt) if isinstance(v, torch.Tensor) else
                   [p.detach().clone().requires_grad_(True) for p in v] if isinstance(v, list) else v)
               for k, v in inputs.items()}
        out = fn(**ins, **opts, backend="torch")
        outs = [o for o in (list(out) if isinstance(out, tuple) else [out]) if o is not None]
        leaves = {}
        for k in wrt:
            leaves.update({f"{k}[{i}]": p for i, p in enumerate(ins[k])} if isinstance(ins[k], list) else {k: ins[k]})
        runs.append(outs + list(grads(outs, leaves).values()))
    assert any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(*runs)), \
        f"options {options} do not change the reference's result: the test could not catch a backend ignoring them"


# ---------------------------------------------------------------------------------------------
# sample_triplanes
# ---------------------------------------------------------------------------------------------

SAMPLE_OPTIONS = [
    {},
    {"box_warp": 3.0},
    {"box_warp": 0.7},
    {"plane_axes": "xyz"},
    {"levels": 1},
    {"levels": 2, "box_warp": 2.5, "plane_axes": "xyz"},
]


def _sample_inputs(pyramid: bool):
    g = torch.Generator().manual_seed(3)
    if pyramid:
        planes = [torch.randn(2, 3, 5, h, w, generator=g, dtype=F64) for h, w in ((7, 9), (4, 5), (2, 3))]
    else:
        planes = torch.randn(2, 3, 5, 8, 6, generator=g, dtype=F64)
    xyz = (torch.rand(2, 13, 3, generator=g, dtype=F64) * 2 - 1) * 1.3
    return dict(planes=planes, xyz=xyz)


def _option_id(options: dict) -> str:
    """Test id of an options dict: key=value pairs, a custom DepthKernel as "custom"."""
    return "-".join(f"{k}={'custom' if isinstance(v, DepthKernel) else v}" for k, v in options.items()) or "defaults"


@pytest.mark.parametrize("backend_device", backend_params("sample"))
@pytest.mark.parametrize("options", SAMPLE_OPTIONS, ids=_option_id)
@pytest.mark.parametrize("pyramid", [False, True], ids=["tensor", "pyramid"])
def test_sample_options(backend_device, options, pyramid):
    backend, device = backend_device
    opts = dict(options)
    inputs = _sample_inputs(pyramid)
    if pyramid:
        if "levels" in opts:
            inputs["planes"] = inputs["planes"][:opts["levels"]]
        else:
            opts["levels"] = 3
    base = {"levels": opts["levels"]} if pyramid else {}  # a pyramid's level count is part of its inputs
    _assert_option_matters(gk.sample_triplanes, inputs, ("planes", "xyz"), opts, base)
    _compare(gk.sample_triplanes, inputs, ("planes", "xyz"), backend, device, **opts)


# ---------------------------------------------------------------------------------------------
# composite
# ---------------------------------------------------------------------------------------------

COMPOSITE_OPTIONS = [
    {},
    {"eps": 0.3},
    {"density_bias": 0.8},
    {"density_bias": -3.0},
    {"white_background": True},
    {"kernel": CUSTOM_KERNEL},
    {"return_weights": False},
    {"eps": 0.05, "density_bias": 0.5, "white_background": True, "kernel": CUSTOM_KERNEL},
]


def _composite_inputs():
    g = torch.Generator().manual_seed(4)
    B, R, S, D = 2, 5, 7, 3
    depths = torch.sort(2 + 2 * torch.rand(B, R, S, generator=g, dtype=F64), -1).values
    target = depths[..., 2] + (depths[..., 4] - depths[..., 2]) * torch.rand(B, R, generator=g, dtype=F64)
    return dict(sigma=torch.randn(B, R, S, generator=g, dtype=F64), rgb=torch.rand(B, R, S, D, generator=g, dtype=F64),
                depths=depths, target_depth=target)


@pytest.mark.parametrize("backend_device", backend_params("composite"))
@pytest.mark.parametrize("options", COMPOSITE_OPTIONS, ids=_option_id)
def test_composite_options(backend_device, options):
    backend, device = backend_device
    inputs = _composite_inputs()
    if options.get("return_weights") is False:  # one output fewer: nothing to compare with the defaults
        want, _ = _compare(gk.composite, inputs, ("sigma", "rgb"), backend, device, **options)
        assert len(want) == 3
        return
    _assert_option_matters(gk.composite, inputs, ("sigma", "rgb"), options, {})
    _compare(gk.composite, inputs, ("sigma", "rgb"), backend, device, **options)


# ---------------------------------------------------------------------------------------------
# render_triplanes
# ---------------------------------------------------------------------------------------------

RENDER_OPTIONS = [
    {},
    {"box_warp": 3.0},
    {"plane_axes": "xyz"},
    {"eps": 0.3},
    {"density_bias": 0.8},
    {"white_background": True},
    {"kernel": CUSTOM_KERNEL},
    {"levels": 1},
    {"box_warp": 2.6, "plane_axes": "xyz", "eps": 0.05, "density_bias": 0.5, "white_background": True,
     "kernel": CUSTOM_KERNEL, "levels": 2},
]


def _render_inputs():
    g = torch.Generator().manual_seed(5)
    B, R, S, C, Hd, D = 1, 9, 6, 4, 8, 3
    rays_o = torch.tensor([[-2.5, 0.3, 0.2]], dtype=F64).expand(B, R, 3) + 0.2 * torch.randn(B, R, 3, generator=g,
                                                                                          dtype=F64)
    aim = 1.2 * (torch.rand(B, R, 3, generator=g, dtype=F64) - 0.5)
    rays_d = torch.nn.functional.normalize(aim - rays_o, dim=-1)
    depths = torch.sort(1.2 + 2.6 * torch.rand(B, R, S, generator=g, dtype=F64), -1).values
    target = depths[..., 1] + (depths[..., 4] - depths[..., 1]) * torch.rand(B, R, generator=g, dtype=F64)
    return dict(planes=torch.randn(B, 3, C, 8, 8, generator=g, dtype=F64), rays_o=rays_o.contiguous(), rays_d=rays_d,
                depths=depths, w1=torch.randn(Hd, C, generator=g, dtype=F64) / math.sqrt(C),
                b1=0.5 * torch.randn(Hd, generator=g, dtype=F64),
                w2=torch.randn(1 + D, Hd, generator=g, dtype=F64) / math.sqrt(Hd),
                b2=0.5 * torch.randn(1 + D, generator=g, dtype=F64), target_depth=target)


def _render(planes, rays_o, rays_d, depths, w1, b1, w2, b2, **kw):
    return gk.render_triplanes(planes, rays_o, rays_d, depths, w1, b1, w2, b2, **kw)


@pytest.mark.parametrize("backend_device", backend_params("render"))
@pytest.mark.parametrize("options", RENDER_OPTIONS, ids=_option_id)
def test_render_options(backend_device, options):
    backend, device = backend_device
    inputs = _render_inputs()
    opts = dict(options)
    opts.setdefault("levels", 2)  # the finest plane through a 2-level pyramid (8x8, 4x4)
    wrt = ("planes", "w1", "b1", "w2", "b2")
    _assert_option_matters(_render, inputs, wrt, opts, {"levels": 2})
    _compare(_render, inputs, wrt, backend, device, **opts)
