"""Public API: validation errors, backend selection, non-contiguous inputs."""
import pytest
import torch

import g3dr_kernels as K
from g3dr_kernels import BackendUnavailableError, reference


def _scene(B=2, C=4, H=8, W=8, R=3, S=5, dtype=torch.float32):
    planes = torch.randn(B, 3, C, H, W, dtype=dtype)
    rays_o, rays_d = torch.randn(B, R, 3, dtype=dtype) * 0.2, torch.randn(B, R, 3, dtype=dtype)
    depths = torch.sort(torch.rand(B, R, S, dtype=dtype), -1).values
    dec = (torch.randn(6, C, dtype=dtype), torch.randn(6, dtype=dtype), torch.randn(4, 6, dtype=dtype), torch.randn(4, dtype=dtype))
    return planes, rays_o, rays_d, depths, dec


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
class TestBadInput:
    def test_sample(self, backend):
        planes, xyz = torch.randn(2, 3, 4, 8, 8), torch.rand(2, 10, 3)
        cases = [
            (lambda: K.sample_triplanes(planes[0], xyz, backend=backend), ValueError, r"5 dims.*3x4x8x8"),
            (lambda: K.sample_triplanes(planes, xyz[0], backend=backend), ValueError, r"xyz must have 3 dims.*10x3"),
            (lambda: K.sample_triplanes(planes, xyz[:1], backend=backend), ValueError, r"1x10x3.*2x3x4x8x8.*batch size"),
            (lambda: K.sample_triplanes(planes, xyz[..., :2], backend=backend), ValueError, r"last dim 3.*2x10x2"),
            (lambda: K.sample_triplanes(planes[:, :2], xyz, backend=backend), ValueError, r"\[B,3,C,H,W\].*2x2x4x8x8"),
            (lambda: K.sample_triplanes(planes, xyz, levels=0, backend=backend), ValueError, r"levels must be"),
            (lambda: K.sample_triplanes(planes, xyz, levels=5, backend=backend), ValueError, r"too small for 5 levels"),
            (lambda: K.sample_triplanes(planes, xyz, plane_axes="yzx", backend=backend), ValueError, r"plane_axes"),
            (lambda: K.sample_triplanes([planes, planes[..., :4, :4]], xyz, levels=3, backend=backend), ValueError,
             r"2 levels.*levels=3"),
            (lambda: K.sample_triplanes(planes, xyz.double(), backend=backend), TypeError, r"dtype"),
            (lambda: K.sample_triplanes(planes, xyz, box_warp=0, backend=backend), ValueError, r"box_warp"),
        ]
        for fn, exc, pat in cases:
            with pytest.raises(exc, match=pat):
                fn()

    def test_composite(self, backend):
        sigma, rgb = torch.randn(2, 3, 5), torch.rand(2, 3, 5, 3)
        depths = torch.sort(torch.rand(2, 3, 5), -1).values
        bad_order = depths.flip(-1)
        nan_depths = depths.clone()
        nan_depths[1, 2, 3] = float("nan")
        cases = [
            (lambda: K.composite(sigma[..., :1], rgb[..., :1, :], depths[..., :1], backend=backend), ValueError, r"S >= 2.*2x3x1"),
            (lambda: K.composite(sigma, rgb, bad_order, backend=backend), ValueError, r"ascending"),
            (lambda: K.composite(sigma, rgb, nan_depths, backend=backend), ValueError, r"NaN"),
            (lambda: K.composite(sigma, rgb[:, :2], depths, backend=backend), ValueError, r"2x3x5.*2x2x5x3"),
            (lambda: K.composite(sigma, rgb, depths[:, :, :4], backend=backend), ValueError, r"2x3x4"),
            (lambda: K.composite(sigma[0], rgb, depths, backend=backend), ValueError, r"sigma must have 3 dims"),
            (lambda: K.composite(sigma, rgb, depths, target_depth=torch.rand(2, 4), backend=backend), ValueError,
             r"target_depth must be \[B,R\] = \[2x3\], got \[2x4\]"),
            (lambda: K.composite(sigma, rgb, depths, kernel=(1, 2), backend=backend), TypeError, r"DepthKernel"),
        ]
        for fn, exc, pat in cases:
            with pytest.raises(exc, match=pat):
                fn()

    def test_render(self, backend):
        planes, ro, rd, depths, dec = _scene()
        cases = [
            (lambda: K.render_triplanes(planes, ro[:1], rd, depths, *dec, backend=backend), ValueError, r"rays_o \[1x3x3\]"),
            (lambda: K.render_triplanes(planes, ro, rd, depths.flip(-1), *dec, backend=backend), ValueError, r"ascending"),
            (lambda: K.render_triplanes(planes, ro, rd, depths, dec[0][:, :3], *dec[1:], backend=backend), ValueError,
             r"w1 \[6x3\]"),
            (lambda: K.render_triplanes(planes, ro, rd, depths, *dec[:2], dec[2][:1], dec[3][:1], backend=backend),
             ValueError, r"D >= 1"),
        ]
        for fn, exc, pat in cases:
            with pytest.raises(exc, match=pat):
                fn()


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        K.sample_triplanes(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 2, 3), backend="gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        K.composite(torch.randn(1, 1, 3), torch.rand(1, 1, 3, 3), torch.arange(3.).view(1, 1, 3), backend="")


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("G3DR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="G3DR_BACKEND"):
        K.sample_triplanes(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 2, 3))
    monkeypatch.setenv("G3DR_BACKEND", "torch")
    K.sample_triplanes(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 2, 3))


def test_cuda_backend_unavailable_on_cpu_tensors():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        K.sample_triplanes(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 2, 3), backend="cuda")


def test_backends_report():
    info = K.backends()
    assert set(info) == {"torch", "cpu", "triton", "cuda"}
    assert info["torch"]["available"] and info["torch"]["ops"] == ["sample", "composite", "render"]
    for v in info.values():
        assert isinstance(v["note"], str) and isinstance(v["available"], bool)


def test_import_does_not_load_extension():
    import subprocess
    import sys
    code = "import sys, g3dr_kernels; print('g3dr_kernels._C' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "False"


def test_non_contiguous_inputs_match():
    planes, ro, rd, depths, (w1, b1, w2, b2) = _scene(dtype=torch.float64)
    nc = lambda t: t.transpose(0, -1).contiguous().transpose(0, -1)  # noqa: E731  same values, other strides
    assert not nc(planes).is_contiguous()
    xyz = torch.rand(2, 9, 3, dtype=torch.float64)
    torch.testing.assert_close(K.sample_triplanes(nc(planes), nc(xyz), backend="torch"),
                               K.sample_triplanes(planes, xyz, backend="torch"))
    sigma, rgb = torch.randn(2, 3, 5, dtype=torch.float64), torch.rand(2, 3, 5, 3, dtype=torch.float64)
    a = K.composite(nc(sigma), nc(rgb), nc(depths), backend="torch")
    b = K.composite(sigma, rgb, depths, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    a = K.render_triplanes(nc(planes), nc(ro), nc(rd), nc(depths), nc(w1), b1, nc(w2), b2, backend="torch")
    b = K.render_triplanes(planes, ro, rd, depths, w1, b1, w2, b2, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_return_weights_flag():
    sigma, rgb = torch.randn(1, 2, 4), torch.rand(1, 2, 4, 3)
    depths = torch.sort(torch.rand(1, 2, 4), -1).values
    assert K.composite(sigma, rgb, depths, return_weights=False, backend="torch").weights is None
    assert K.composite(sigma, rgb, depths, backend="torch").weights.shape == (1, 2, 3)


def test_reference_matches_official_layout():
    """The reference equals the official G3DR/EG3D code path (benchmarks/official.py) it replaces."""
    from benchmarks import official
    planes, ro, rd, depths, dec = _scene(dtype=torch.float64)
    target = torch.rand(2, 3, dtype=torch.float64)
    got = reference.render_triplanes(planes, ro, rd, depths, *dec, target_depth=target)
    want = official.render(planes, ro, rd, depths, *dec, target_depth=target)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.reshape(a.shape))
