"""The option blocks (g3dr_kernels/_params.py): the flat order every layer passes is the one the C++
extension declares (csrc/include/g3dr/params.h), the generated schemas agree, and a block validates
itself."""
import math

import pytest
import torch

import g3dr_kernels as gk
from g3dr_kernels._params import CompositeParams, RenderParams, SampleParams
from g3dr_kernels._types import DepthKernel

BLOCKS = {"sample": SampleParams, "composite": CompositeParams, "render": RenderParams}
ext_only = pytest.mark.skipif(not gk._backend.has_kernel("render", "cpu"), reason="the C++ extension is not built")


def _render_params(scale=2 / 2.4, plane_axes=0):
    return RenderParams(SampleParams(scale, plane_axes), CompositeParams(DepthKernel(), -1.0, 1e-3, False))


def test_render_fields_are_sample_then_composite():
    assert RenderParams.field_names() == SampleParams.field_names() + CompositeParams.field_names()
    assert RenderParams.field_names() == ("scale", "plane_axes", "s1", "s2", "c_min", "c_max", "density_bias", "eps",
                                          "white_bg")
    assert RenderParams.schema().startswith("float scale, int plane_axes, float s1")
    assert RenderParams.schema().endswith("float eps, bool white_bg")


def test_flat_round_trip_and_types():
    p = RenderParams(SampleParams(1, 1), CompositeParams(DepthKernel(s1=2, s2=1), 0, 1, 1))
    flat = p.flat()
    assert flat == (1.0, 1, 2.0, 1.0, 0.05, 1.0, 0.0, 1.0, True)
    assert [type(v) for v in flat] == [float, int, float, float, float, float, float, float, bool]
    q, rest = RenderParams.split(flat + ("after",))
    assert q == RenderParams(SampleParams(1.0, 1), CompositeParams(DepthKernel(2.0, 1.0, 0.05, 1.0), 0.0, 1.0, True))
    assert rest == ("after",)
    with pytest.raises(TypeError, match=r"RenderParams needs 9 values \(scale, plane_axes, s1"):
        RenderParams.split(flat[:-1])


@pytest.mark.parametrize("bad, pattern", [
    (dict(scale=float("nan")), r"scale \(2 / box_warp\) must be finite and > 0, got nan"),
    (dict(scale=-1.0), r"scale \(2 / box_warp\) must be finite and > 0, got -1.0"),
    (dict(plane_axes=2), r"plane_axes must be 0 \(eg3d\) or 1 \(xyz\), got 2"),
])
def test_block_validates(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        _render_params(**bad)
    flat = list(_render_params().flat())
    for k, v in bad.items():
        flat[RenderParams.field_names().index(k)] = v
    with pytest.raises(ValueError, match=pattern):  # as a launcher rebuilds it from the flat values
        RenderParams.split(flat)
    with pytest.raises(ValueError, match=r"DepthKernel.s2 must be > 0"):  # the kernel validates itself
        CompositeParams.split((1.25, 0.0, 0.05, 1.0, -1.0, 1e-3, False))


@ext_only
@pytest.mark.parametrize("op", sorted(BLOCKS))
def test_cpp_field_order_is_python_order(op):
    assert tuple(torch.ops.g3dr_C.params_fields(op)) == BLOCKS[op].field_names()


def _args(schema):
    return [(a.name, str(a.type)) for a in schema.arguments]


@ext_only
@pytest.mark.parametrize("name", ["sample_fwd", "sample_bwd", "composite_fwd", "composite_bwd", "render_fwd",
                                  "render_bwd"])
def test_custom_op_schema_is_cpp_schema_plus_backend(name):
    """The Python op g3dr::<name> takes exactly the C++ op's arguments (names, types, order), then the
    backend; the option block sits in both as its flat fields."""
    from g3dr_kernels.ops import composite, render, sample  # noqa: F401  (register torch.ops.g3dr.*)
    cpp = _args(getattr(torch.ops.g3dr_C, name).default._schema)
    py = _args(getattr(torch.ops.g3dr, name).default._schema)
    assert py == cpp + [("backend", "str")]
    block = BLOCKS[name.split("_")[0]]
    names = [n for n, _ in cpp]
    i = names.index(block.field_names()[0])
    assert tuple(names[i:i + block.size()]) == block.field_names()


@ext_only
def test_cpp_boundary_validates_the_block():
    sigma, rgb = torch.randn(1, 2, 4), torch.rand(1, 2, 4, 3)
    depths = torch.linspace(1, 2, 4).expand(1, 2, 4).contiguous()
    with pytest.raises(RuntimeError, match=r"composite: depth kernel needs s2 > 0 and c_min <= c_max, got s2=0"):
        torch.ops.g3dr_C.composite_fwd(sigma, rgb, depths, None, 1.25, 0.0, 0.05, 1.0, -1.0, 1e-3, False, True)
    levels, xyz = [torch.randn(1, 3, 2, 4, 4)], torch.rand(1, 5, 3)
    with pytest.raises(RuntimeError, match=r"plane_axes must be 0 \(eg3d\) or 1 \(xyz\), got 3"):
        torch.ops.g3dr_C.sample_fwd(levels, xyz, 1.0, 3)
    with pytest.raises(RuntimeError, match=r"unknown op 'blend'"):
        torch.ops.g3dr_C.params_fields("blend")


def test_public_defaults_flatten_as_before():
    """What render_triplanes passes for its defaults: the values the ops took before the blocks."""
    p = RenderParams(SampleParams(2.0 / 2.0, 0), CompositeParams(DepthKernel(), -1.0, 1e-3, False))
    assert p.flat() == (1.0, 0, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False)
    assert all(math.isfinite(v) for v in p.flat())


@ext_only
def test_cpp_op_reads_options_by_name():
    """The boxed boundary reads the options in schema order, so named arguments land where they belong."""
    g = torch.Generator().manual_seed(3)
    levels, xyz = [torch.randn(1, 3, 2, 4, 4, generator=g)], torch.rand(1, 5, 3, generator=g) * 2 - 1
    want = torch.ops.g3dr_C.sample_fwd(levels, xyz, 0.5, 1)
    got = torch.ops.g3dr_C.sample_fwd(levels, xyz, plane_axes=1, scale=0.5)
    assert torch.equal(got, want)
    assert not torch.equal(torch.ops.g3dr_C.sample_fwd(levels, xyz, 0.5, 0), want)  # the options do matter
