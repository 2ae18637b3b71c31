"""Public API: validation errors, backend selection, non-contiguous inputs."""
import os

import pytest
import torch

import g3dr_kernels as K
from g3dr_kernels import BackendUnavailableError, _backend, reference
from _util import backend_params


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
            (lambda: K.sample_triplanes(planes, xyz, box_warp=float("inf"), backend=backend), ValueError,
             r"box_warp must be a finite positive number, got inf"),
            (lambda: K.sample_triplanes(planes, xyz, box_warp=float("nan"), backend=backend), ValueError, r"box_warp"),
            (lambda: K.sample_triplanes(planes, xyz, box_warp=1e-300, backend=backend), ValueError,
             r"box_warp must be in .*normal float32.*1e-300"),
            (lambda: K.sample_triplanes(planes, xyz, box_warp=1e300, backend=backend), ValueError, r"box_warp"),
            (lambda: K.sample_triplanes(planes, xyz, box_warp=True, backend=backend), ValueError, r"box_warp"),
            (lambda: K.sample_triplanes(planes[:, :, :0], xyz, backend=backend), ValueError, r"C >= 1.*2x3x0x8x8"),
            (lambda: K.sample_triplanes([planes[:, :, :0]], xyz, levels=1, backend=backend), ValueError,
             r"no channels.*2x3x0x8x8"),
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
        inf_depths = depths.clone()
        inf_depths[0, 1, 4] = float("inf")  # still ascending
        inf_target = torch.rand(2, 3)
        inf_target[1, 0] = -float("inf")
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
            (lambda: K.composite(sigma, rgb, inf_depths, backend=backend), ValueError, r"depths.*NaN or inf"),
            (lambda: K.composite(sigma, rgb, depths, target_depth=inf_target, backend=backend), ValueError,
             r"target_depth \[2x3\] contains NaN or inf"),
        ]
        for fn, exc, pat in cases:
            with pytest.raises(exc, match=pat):
                fn()

    def test_render(self, backend):
        planes, ro, rd, depths, dec = _scene()
        inf_depths = depths.clone()
        inf_depths[1, 2, 4] = float("inf")
        cases = [
            (lambda: K.render_triplanes(planes, ro[:1], rd, depths, *dec, backend=backend), ValueError, r"rays_o \[1x3x3\]"),
            (lambda: K.render_triplanes(planes, ro, rd, depths.flip(-1), *dec, backend=backend), ValueError, r"ascending"),
            (lambda: K.render_triplanes(planes, ro, rd, depths, dec[0][:, :3], *dec[1:], backend=backend), ValueError,
             r"w1 \[6x3\]"),
            (lambda: K.render_triplanes(planes, ro, rd, depths, *dec[:2], dec[2][:1], dec[3][:1], backend=backend),
             ValueError, r"D >= 1"),
            (lambda: K.render_triplanes(planes, ro.double(), rd.double(), depths.double(), *dec, backend=backend),
             TypeError, r"rays and depths are torch.float64 but planes are torch.float32"),
            (lambda: K.render_triplanes(planes, ro, rd, depths, *[t.double() for t in dec], backend=backend),
             TypeError, r"decoder weights are torch.float64 but planes are torch.float32"),
            (lambda: K.render_triplanes(planes, ro, rd, inf_depths, *dec, backend=backend), ValueError,
             r"depths \[2x3x5\] contain NaN or inf"),
            (lambda: K.render_triplanes(planes, ro, rd, depths, *dec, box_warp=float("inf"), backend=backend),
             ValueError, r"box_warp"),
            (lambda: K.render_triplanes(planes[:, :, :0], ro, rd, depths, dec[0][:, :0], *dec[1:], backend=backend),
             ValueError, r"C >= 1"),
        ]
        for fn, exc, pat in cases:
            with pytest.raises(exc, match=pat):
                fn()

    def test_kernel_boundary(self, backend):
        """Inputs that skip the Python validation (the ops called directly) reach the C++ TORCH_CHECKs
        and the Triton launch checks, and fail there with a message, not a crash or a wrong result."""
        if backend == "torch":
            pytest.skip("the torch backend is the reference itself: no kernel boundary")
        if backend == "triton" and not _backend.triton_interpreting() and not torch.cuda.is_available():
            pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
        k = {op: _backend.kernels(op, backend) for op in ("sample", "composite", "render")}
        exc = RuntimeError if backend == "cpu" else (ValueError, TypeError)
        planes, xyz = torch.randn(2, 3, 4, 8, 8), torch.rand(2, 10, 3)
        sigma, rgb = torch.randn(2, 3, 5), torch.rand(2, 3, 5, 3)
        depths = torch.sort(torch.rand(2, 3, 5), -1).values
        kern = (1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True)
        p2, ro, rd, dz, dec = _scene()
        cases = [  # (call, pattern of the cpu message, pattern of the triton message)
            (lambda: k["sample"].sample_fwd([planes], xyz[:1], 1.0, 0), r"xyz must be \[B,N,3\] with B",
             r"levels must be \[B,3,C,H_l,W_l\] with xyz"),
            (lambda: k["sample"].sample_fwd([planes], xyz, float("inf"), 0), r"scale .*finite", r"scale .*finite"),
            (lambda: k["sample"].sample_fwd([planes], xyz, 1.0, 2), r"plane_axes", r"plane_axes"),
            (lambda: k["composite"].composite_fwd(sigma, rgb[:, :, :4], depths, None, *kern),
             r"\[2, 3, 5\].*\[2, 3, 4, 3\]", r"expected sigma \[B,R,S\]"),
            (lambda: k["composite"].composite_fwd(sigma, rgb, depths, torch.rand(3, 2), *kern),
             r"target must be \[B,R\]", r"target must be \[B,R\]"),
            (lambda: k["render"].render_fwd([p2], ro, rd, dz, dec[0][:, :2], *dec[1:], None, 1.0, 0, *kern),
             r"w1 \[6, 2\]", r"w1 must be \[6, 4\]"),
            (lambda: k["render"].render_fwd([p2], ro[:, :2], rd, dz, *dec, None, 1.0, 0, *kern),
             r"rays_o and rays_d must be", r"rays_o must be \[2, 3, 3\]"),
            (lambda: k["render"].render_fwd([p2], ro, rd, dz, *dec, None, float("nan"), 0, *kern),
             r"scale \(2 / box_warp\) must be finite", r"scale \(2 / box_warp\) must be finite"),
            (lambda: k["render"].render_fwd([p2], ro, rd, dz, *dec, torch.rand(2, 4), 1.0, 0, *kern),
             r"target must be \[B,R\]", r"target must be \[2, 3\]"),
        ]
        for fn, cpu_pat, triton_pat in cases:
            with pytest.raises(exc, match=cpu_pat if backend == "cpu" else triton_pat):
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
    assert _backend.resolve("auto", "sample", torch.device("cpu")) == "torch"
    assert _backend.resolve("cpu", "sample", torch.device("cpu")) == "cpu" or not K.backends()["cpu"]["available"]
    called = []  # the reference really runs for backend="auto" (and only then)
    monkeypatch.setattr(reference, "sample_pyramid", lambda *a, **k: called.append(1) or torch.zeros(1, 2, 2))
    K.sample_triplanes(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 2, 3))
    assert called == [1]
    monkeypatch.setenv("G3DR_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run sample"):
        K.sample_triplanes(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 2, 3))


def test_required_backends_are_available():
    """G3DR_REQUIRE_BACKENDS (comma-separated; `make test` sets "cpu") turns a missing backend into a
    failure: without it a failed extension build would only turn the cpu tests into skips."""
    required = [b.strip() for b in os.environ.get("G3DR_REQUIRE_BACKENDS", "").split(",") if b.strip()]
    if not required:
        pytest.skip("G3DR_REQUIRE_BACKENDS is not set (make test sets it to 'cpu')")
    info = K.backends()
    for b in required:
        assert b in info, f"G3DR_REQUIRE_BACKENDS names an unknown backend {b!r}; known: {sorted(info)}"
        assert info[b]["available"] and info[b]["ops"] == ["sample", "composite", "render"], \
            f"backend {b!r} is required (G3DR_REQUIRE_BACKENDS) but not fully available: {info[b]}"


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


@pytest.mark.parametrize("backend_device", [pytest.param(("torch", "cpu"), id="torch")] + backend_params("render"))
def test_non_contiguous_inputs_match(backend_device):
    """Each backend on non-contiguous inputs equals the reference on contiguous copies."""
    backend, dev = backend_device
    planes, ro, rd, depths, (w1, b1, w2, b2) = _scene(dtype=torch.float64)
    nc = lambda t: t.to(dev).transpose(0, -1).contiguous().transpose(0, -1)  # noqa: E731  same values, other strides
    assert not nc(planes).is_contiguous() and not nc(w1).is_contiguous()
    xyz = torch.rand(2, 9, 3, dtype=torch.float64)
    close = lambda a, b: torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-11)  # noqa: E731
    close(K.sample_triplanes(nc(planes), nc(xyz), backend=backend), K.sample_triplanes(planes, xyz, backend="torch"))
    sigma, rgb = torch.randn(2, 3, 5, dtype=torch.float64), torch.rand(2, 3, 5, 3, dtype=torch.float64)
    a = K.composite(nc(sigma), nc(rgb), nc(depths), backend=backend)
    b = K.composite(sigma, rgb, depths, backend="torch")
    for x, y in zip(a, b):
        close(x, y)
    a = K.render_triplanes(nc(planes), nc(ro), nc(rd), nc(depths), nc(w1), b1.to(dev), nc(w2), b2.to(dev),
                           backend=backend)
    b = K.render_triplanes(planes, ro, rd, depths, w1, b1, w2, b2, backend="torch")
    for x, y in zip(a, b):
        close(x, y)


ALL = [pytest.param(("torch", "cpu"), id="torch")]


@pytest.mark.parametrize("backend_device", ALL + backend_params("render"))
def test_empty_batch_every_op(backend_device):
    """B = 0 (and R = 0) run forward and backward on every op and backend: empty outputs, zero gradients."""
    backend, dev = backend_device
    for B, R in ((0, 3), (2, 0)):
        planes, ro, rd, depths, dec = _scene(B=max(B, 1), R=max(R, 1))
        planes = planes[:B].to(dev).requires_grad_()
        ro, rd, depths = ro[:B, :R].to(dev), rd[:B, :R].to(dev), depths[:B, :R].to(dev)
        dec = [t.to(dev).requires_grad_() for t in dec]
        f = K.sample_triplanes(planes, ro, backend=backend)
        assert f.shape == (B, R, 4)
        out = K.render_triplanes(planes, ro, rd, depths, *dec, backend=backend)
        assert out.rgb.shape == (B, R, 3) and out.weights.shape == (B, R, 4)
        (f.sum() + out.rgb.sum() + out.depth.sum()).backward()
        for t in [planes, *dec]:
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()
        sigma = torch.randn(B, R, 5, device=dev, requires_grad=True)
        c = K.composite(sigma, torch.rand(B, R, 5, 3, device=dev), depths, backend=backend)
        assert c.rgb.shape == (B, R, 3)
        c.rgb.sum().backward()
        assert sigma.grad.shape == (B, R, 5)


@pytest.mark.parametrize("backend_device", ALL + backend_params("render"))
def test_non_finite_rays_give_nan_like_the_reference(backend_device):
    """Decision (docs/backends.md): a ray with a NaN/inf origin or direction renders NaN on every backend, as the
    reference (grid_sample) does, and its NaN reaches the gradients on every backend alike; non-finite
    depths and targets are rejected at the boundary (test_render above)."""
    backend, dev = backend_device
    planes, ro, rd, depths, dec = _scene(R=5, dtype=torch.float64)
    ro[0, 1, 0] = float("nan")
    rd[1, 3, 2] = float("inf")
    rd[1, 4, 1] = -float("inf")
    res = {}
    for b, d in ((backend, dev), ("torch", "cpu")):
        p = planes.to(d).requires_grad_()
        w = [t.to(d).requires_grad_() for t in dec]
        out = K.render_triplanes(p, ro.to(d), rd.to(d), depths.to(d), *w, backend=b)
        (out.rgb.sum() + out.depth.sum() + out.opacity.sum()).backward()
        res[b] = ([o.detach().cpu() for o in out], [t.grad.cpu() for t in (p, *w)])
    bad = torch.zeros(2, 5, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = bad[1, 4] = True
    for got, want in zip(res[backend][0], res["torch"][0]):
        assert torch.equal(got.isnan(), want.isnan())
        assert got.reshape(2, 5, -1).isnan().all(-1).eq(bad).all()  # exactly the bad rays, every channel
        torch.testing.assert_close(got[~bad], want[~bad], rtol=1e-9, atol=1e-11)
    assert [g.isfinite().all().item() for g in res[backend][1]] == [g.isfinite().all().item() for g in res["torch"][1]]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not _backend.has_kernel("sample", "cpu"), reason="the C++ extension is not built"))])
def test_half_planes_build_their_pyramid(backend):
    """fp16/bf16 planes given as one tensor with levels > 1 (interpolate has no half antialias kernel on
    the CPU): the pyramid is built in float32 and cast back, so the result is the float32 one rounded."""
    planes, xyz = torch.randn(2, 3, 4, 8, 8), torch.rand(2, 10, 3) * 2 - 1
    for dt in (torch.float16, torch.bfloat16):
        pyr = reference.build_pyramid(planes.to(dt), 3)
        assert [p.dtype for p in pyr] == [dt] * 3 and [p.shape[-1] for p in pyr] == [8, 4, 2]
        p = planes.to(dt).requires_grad_()
        got = K.sample_triplanes(p, xyz, levels=3, backend=backend)
        want = K.sample_triplanes(planes.to(dt).float(), xyz, levels=3, backend="torch")
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
        got.float().sum().backward()
        assert p.grad.dtype == dt and p.grad.isfinite().all() and p.grad.abs().sum() > 0


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
