"""g3dr.export: meshes of a known density (a sphere triplane built here), depth meshes, voxels,
coloured depth and videos; bad input leaves nothing half-written."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from g3dr import export as E
from g3dr_kernels.nn import TriplaneDecoder

trimesh = pytest.importorskip("trimesh")

R_SPHERE = 0.5
ISO = 10.0
GAIN = 2.0  # colour = sigmoid(GAIN * coordinate)


def sphere_scene(n=64, C=4):
    """One-level triplane + decoder (EG3D plane axes, box_warp 2) whose density crosses ISO exactly on
    the sphere |p| = R_SPHERE (higher inside) and whose colour is (sigmoid(2x), sigmoid(2y), sigmoid(2z)).

    Features (mean over the 3 planes): f0 = |p|^2 / 3 (x^2+y^2 on plane xy, z^2 on plane xz), f1 = x/3,
    f2 = y/3, f3 = z/3; bilinear sampling reproduces linear fields exactly and |p|^2 to ~1e-4.
    Hidden unit 0 = softplus(A (r^2 - |p|^2)), so at the sphere it is log 2 and sigma = softplus^-1(ISO) + 1,
    i.e. density = softplus(sigma - 1) = ISO there; density is monotone in |p| (~0 outside)."""
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    b, a = torch.meshgrid(c, c, indexing="ij")  # a: width coordinate, b: height coordinate
    P = torch.zeros(1, 3, C, n, n, dtype=torch.float64)
    P[0, 0, 0], P[0, 1, 0] = a ** 2 + b ** 2, b ** 2  # plane 0 reads (x, y), plane 1 reads (x, z)
    P[0, 0, 1], P[0, 0, 2], P[0, 1, 3] = a, b, b
    A, K = 20.0, 30.0
    hidden = 4
    w1 = torch.zeros(hidden, C, dtype=torch.float64)
    b1 = torch.zeros(hidden, dtype=torch.float64)
    w2 = torch.zeros(4, hidden, dtype=torch.float64)
    b2 = torch.zeros(4, dtype=torch.float64)
    w1[0, 0], b1[0] = -3 * A, A * R_SPHERE ** 2
    sp_inv_iso = ISO + math.log(-math.expm1(-ISO))
    w2[0, 0], b2[0] = K, sp_inv_iso + 1.0 - K * math.log(2.0)
    for k in range(3):  # softplus(3 f + 20) = coordinate + 20 to 1e-8
        w1[1 + k, 1 + k], b1[1 + k] = 3.0, 20.0
        w2[1 + k, 1 + k], b2[1 + k] = GAIN, -GAIN * 20.0
    dec = TriplaneDecoder(C, hidden, 3).double()
    with torch.no_grad():  # stored weights such that effective_params() returns exactly w1, b1, w2, b2
        dec.weight1.copy_(w1 * math.sqrt(C))
        dec.bias1.copy_(b1)
        dec.weight2.copy_(w2 * math.sqrt(hidden))
        dec.bias2.copy_(b2)
    return P.float(), dec.float()


def expected_color(v):
    return torch.sigmoid(GAIN * torch.as_tensor(v, dtype=torch.float64)) * (1 + 2e-3) - 1e-3


@pytest.fixture(scope="module")
def sphere():
    return sphere_scene()


@pytest.fixture(scope="module")
def sphere_mesh(sphere):
    planes, dec = sphere
    return E.extract_mesh(planes, dec, resolution=48, iso=ISO, levels=1)


def test_density_grid_matches_the_field(sphere):
    planes, dec = sphere
    grid = E.density_grid(planes, dec, 9, levels=1, chunk=100)
    pts = E.grid_points(9)
    r = pts.norm(dim=-1)
    assert grid.shape == (9, 9, 9)
    assert (grid[r < R_SPHERE - 0.05] > ISO).all() and (grid[r > R_SPHERE + 0.05] < ISO).all()
    assert grid[4, 4, 4] > 100 and grid[0, 0, 0] < 1e-3
    # x-index first: the grid's [i, j, k] is the point (x_i, y_j, z_k)
    torch.testing.assert_close(pts[2, 5, 7], torch.tensor([-0.5, 0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(E.density_grid(planes, dec, 9, levels=1, chunk=7), grid)
    cells = E.grid_points(4, ((0, 0, 0), (1, 2, 4)), cell_centers=True)
    torch.testing.assert_close(cells[0, 0, 0], torch.tensor([0.125, 0.25, 0.5], dtype=torch.float64))


def test_query_field_backends_agree(sphere):
    planes, dec = sphere
    pts = (torch.rand(500, 3) * 2 - 1) * 0.95  # off the outer half-texel, where zero padding blends in
    d_ref, c_ref = E.query_field(planes, dec, pts, levels=1, backend="torch")
    d, c = E.query_field(planes, dec, pts, levels=1, chunk=64)  # auto: the C++ kernel when built
    torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=1e-3)  # density up to ~140: fp32 sampling sums
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_ref.double(), expected_color(pts), atol=1e-5, rtol=0)  # the colour field


def test_sphere_mesh_area_volume_and_colours(sphere_mesh):
    m = sphere_mesh
    assert m.is_watertight and m.is_winding_consistent
    assert m.volume > 0  # outward normals
    area, vol = 4 * math.pi * R_SPHERE ** 2, 4 / 3 * math.pi * R_SPHERE ** 3
    assert m.area == pytest.approx(area, rel=0.03)
    assert m.volume == pytest.approx(vol, rel=0.03)
    radii = np.linalg.norm(m.vertices, axis=1)
    assert np.abs(radii - R_SPHERE).max() < 0.01
    got = torch.from_numpy(m.visual.vertex_colors[:, :3].astype(np.float64)) / 255
    torch.testing.assert_close(got, expected_color(m.vertices), atol=1 / 255, rtol=0)  # uint8 rounding


def test_mesh_points_chamfer_against_the_true_sphere(sphere_mesh):
    from g3dr import metrics as M
    pts = E.mesh_points(sphere_mesh, 4000, seed=0)
    assert pts.shape == (4000, 3) and pts.dtype == torch.float64
    assert (pts.norm(dim=1) - R_SPHERE).abs().max() < 0.01  # on the exported surface, hence on the sphere
    truth = F.normalize(torch.randn(4000, 3, dtype=torch.float64), dim=1) * R_SPHERE
    assert M.fscore(pts, truth, 0.05)["fscore"] > 0.99
    with pytest.raises(ValueError, match="n must be"):
        E.mesh_points(sphere_mesh, 0)


@pytest.mark.parametrize("ext", [".glb", ".obj", ".ply"])
def test_save_mesh_every_format_reloads(sphere_mesh, tmp_path, ext):
    path = E.save_mesh(sphere_mesh, tmp_path / f"sphere{ext}")
    assert os.listdir(tmp_path) == [f"sphere{ext}"]  # no temp file left
    m = trimesh.load(path, force="mesh", process=True)
    m.merge_vertices()  # glb/obj may split vertices; the shape must survive
    assert m.is_watertight
    assert m.area == pytest.approx(4 * math.pi * R_SPHERE ** 2, rel=0.03)
    assert m.volume == pytest.approx(4 / 3 * math.pi * R_SPHERE ** 3, rel=0.03)
    vis = m.visual.to_color() if hasattr(m.visual, "to_color") else m.visual  # glb may load as a texture visual
    col = np.asarray(vis.vertex_colors)[:, :3].astype(np.float64) / 255
    torch.testing.assert_close(torch.from_numpy(col), expected_color(m.vertices), atol=1.5 / 255, rtol=0)


def test_extract_mesh_options(sphere):
    planes, dec = sphere
    params = dec.effective_params()
    box = ((-0.6, -0.6, 0.0), (0.6, 0.6, 0.6))  # the top half of the sphere, closed off by the crop
    half = E.extract_mesh(planes, params, resolution=40, iso=ISO, bbox=box, levels=1)
    assert half.is_watertight
    assert half.volume == pytest.approx(2 / 3 * math.pi * R_SPHERE ** 3, rel=0.04)
    assert half.vertices[:, 2].min() >= -1e-6
    small = E.extract_mesh(planes, params, resolution=32, iso=ISO, levels=1, decimate=300, largest_component=True)
    assert len(small.faces) <= 330 and small.volume > 0
    assert len(small.visual.vertex_colors) == len(small.vertices)  # colours queried after decimation
    with pytest.raises(ValueError, match="decimate"):
        E.extract_mesh(planes, params, resolution=16, levels=1, decimate=2.5)
    with pytest.raises(ValueError, match="no surface"):
        E.extract_mesh(planes, params, resolution=16, iso=1e6, levels=1)
    with pytest.raises(ValueError, match="bbox"):
        E.extract_mesh(planes, params, resolution=16, bbox=((0, 0, 0), (1, -1, 1)), levels=1)
    with pytest.raises(ValueError, match="one scene"):
        E.density_grid(planes.expand(2, -1, -1, -1, -1), params, 8, levels=1)


def test_save_mesh_bad_input_leaves_nothing(sphere_mesh, tmp_path):
    with pytest.raises(ValueError, match="unknown mesh format '.stl'"):
        E.save_mesh(sphere_mesh, tmp_path / "m.stl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        E.save_mesh(sphere_mesh, tmp_path / "missing" / "m.glb")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        E.save_mesh(sphere_mesh, blocker / "m.glb")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_unwritable_folder_is_named(sphere_mesh, tmp_path, monkeypatch):
    def denied(*a, **k):  # what a read-only folder gives (root ignores chmod, so it is simulated)
        raise PermissionError(13, "Permission denied")

    import g3dr.files
    monkeypatch.setattr(g3dr.files.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=f"folder {tmp_path} is not writable"):
        E.save_mesh(sphere_mesh, tmp_path / "m.ply")
    with pytest.raises(PermissionError, match="not writable"):
        E.save_voxels(tmp_path / "v.npz", torch.zeros(2, 2, 2, dtype=torch.bool))
    assert os.listdir(tmp_path) == []


def test_atomic_write_cleans_up_on_failure(tmp_path):
    target = tmp_path / "v.gif"
    target.write_bytes(b"old")

    def boom(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        E._atomic_write(target, boom)
    assert os.listdir(tmp_path) == ["v.gif"] and target.read_bytes() == b"old"  # old file intact, no temp


# ------------------------------------------------------------------ depth mesh


def _plane_view(H=6, W=5, depth=2.0):
    from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays
    rays_o, rays_d = g3dr_rays(g3dr_cam2world(math.pi / 2, math.pi / 2), 18.0, H, W)
    return rays_o, rays_d, torch.full((H, W), depth)


def test_depth_mesh_height_field_faces_camera_and_cuts_jumps():
    H, W = 6, 5
    rays_o, rays_d, depth = _plane_view(H, W)
    rgb = torch.rand(3, H, W)
    m = E.depth_mesh(rgb, depth, rays_o, rays_d)
    assert len(m.faces) == 2 * (H - 1) * (W - 1) and len(m.vertices) == H * W
    want = rays_o[0] + depth.reshape(-1, 1) * rays_d[0]
    torch.testing.assert_close(torch.from_numpy(m.vertices).float(), want)
    col = torch.from_numpy(m.visual.vertex_colors[:, :3].astype(np.float32)) / 255
    torch.testing.assert_close(col, rgb.reshape(3, -1).t(), atol=0.5 / 255, rtol=0)
    # normals face the camera: against the view rays
    centre = torch.from_numpy(m.triangles_center)
    to_cam = F.normalize(rays_o[0, 0].double() - centre, dim=1)
    assert (torch.from_numpy(m.face_normals) * to_cam).sum(1).min() > 0.9
    # a depth step between rows 2 and 3 removes the (W-1) * 2 triangles that span it
    step = depth.clone()
    step[3:] += 0.5
    cut = E.depth_mesh(rgb, step, rays_o.reshape(H, W, 3), rays_d.reshape(H * W, 3), max_edge_jump=0.1)
    assert len(cut.faces) == 2 * (H - 1) * (W - 1) - 2 * (W - 1)
    mask = torch.ones(H, W, dtype=torch.bool)
    mask[0, 0] = False
    assert len(E.depth_mesh(rgb, depth, rays_o, rays_d, mask=mask).faces) == 2 * (H - 1) * (W - 1) - 1


def test_depth_mesh_bad_input():
    rays_o, rays_d, depth = _plane_view()
    with pytest.raises(ValueError, match=r"rgb must be \[3,H,W\]"):
        E.depth_mesh(torch.rand(3, 5, 5), depth, rays_o, rays_d)
    with pytest.raises(ValueError, match="one ray per pixel"):
        E.depth_mesh(torch.rand(3, 6, 5), depth, rays_o[:, :10], rays_d)


# ------------------------------------------------------------------ voxels


def test_voxel_occupancy_of_the_sphere(sphere):
    planes, dec = sphere
    occ = E.voxel_occupancy(planes, dec, 20, iso=ISO, levels=1)
    assert occ.dtype == torch.bool and occ.shape == (20, 20, 20)
    centres = E.grid_points(20, cell_centers=True).norm(dim=-1)
    far = (centres - R_SPHERE).abs() > 0.02  # away from the surface the answer is certain
    assert torch.equal(occ[far], (centres < R_SPHERE)[far])


@pytest.mark.parametrize("ext", [".npy", ".npz", ".binvox"])
def test_voxels_round_trip(tmp_path, ext):
    occ = torch.rand(7, 7, 7) > 0.6
    occ[0, :, :] = True  # long runs too (binvox splits runs at 255)
    occ = occ.repeat(3, 3, 3)[:20, :20, :20].contiguous()  # 20^3: runs > 255 happen
    box = ((-1.0, -0.5, 0.0), (1.0, 1.5, 2.0))
    path = E.save_voxels(tmp_path / f"v{ext}", occ, bbox=box)
    assert os.listdir(tmp_path) == [f"v{ext}"]
    back, bb = E.load_voxels(path)
    assert torch.equal(back, occ)
    if ext != ".npy":
        torch.testing.assert_close(bb[0], torch.tensor(box[0], dtype=torch.float64))
        torch.testing.assert_close(bb[1], torch.tensor(box[1], dtype=torch.float64))


def test_binvox_matches_the_spec_and_trimesh_reader(tmp_path):
    occ = torch.zeros(4, 4, 4, dtype=torch.bool)
    occ[1, 2, 3] = True  # x=1, y=2, z=3 -> index x*16 + z*4 + y = 30 (y fastest, then z, then x)
    path = E.save_voxels(tmp_path / "one.binvox", occ)
    raw = path.read_bytes()
    body = raw[raw.index(b"data\n") + 5:]
    assert raw.startswith(b"#binvox 1\ndim 4 4 4\ntranslate -1 -1 -1\nscale 2\n")
    assert list(body) == [0, 30, 1, 1, 0, 33]
    from trimesh.exchange.binvox import load_binvox
    with open(path, "rb") as f:
        vox = load_binvox(f)
    assert np.array_equal(np.asarray(vox.matrix), occ.numpy())


def test_save_voxels_bad_input(tmp_path):
    occ = torch.zeros(4, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown voxel format"):
        E.save_voxels(tmp_path / "v.vox", occ)
    with pytest.raises(ValueError, match="bool"):
        E.save_voxels(tmp_path / "v.npy", occ.float())
    with pytest.raises(ValueError, match="cubic"):
        E.save_voxels(tmp_path / "v.binvox", occ, bbox=((0, 0, 0), (1, 2, 1)))
    (tmp_path / "bad.binvox").write_bytes(b"#binvox 1\ndim 4 4 4\ndata\n\x00\x05")
    with pytest.raises(ValueError, match="needs 64"):
        E.load_voxels(tmp_path / "bad.binvox")
    assert sorted(os.listdir(tmp_path)) == ["bad.binvox"]


# ------------------------------------------------------------------ coloured depth


def test_colorize_depth_range_mask_and_embedded_maps():
    d = torch.linspace(4, 6, 100).reshape(10, 10)
    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[0, 0] = False
    for cmap in ("turbo", "viridis"):
        img = E.colorize_depth(d, mask, cmap=cmap, use_matplotlib=False)
        assert img.dtype == np.uint8 and img.shape == (10, 10, 3)
        assert (img[0, 0] == 0).all()  # masked -> background
        ends = E.apply_colormap(np.array([1.0, 0.0]), cmap, use_matplotlib=False)
        np.testing.assert_allclose(img[0, 1] / 255, ends[0], atol=1 / 255)  # nearest valid (below p2) -> high end
        np.testing.assert_allclose(img[9, 9] / 255, ends[1], atol=1 / 255)  # farthest -> low end
    mpl = pytest.importorskip("matplotlib")
    t = np.linspace(0, 1, 513)
    for cmap, tol in (("turbo", 0.02), ("viridis", 0.013)):
        np.testing.assert_allclose(E.apply_colormap(t, cmap, use_matplotlib=False),
                                   mpl.colormaps[cmap](t)[:, :3], atol=tol)
    with pytest.raises(ValueError, match="cmap"):
        E.colorize_depth(d, cmap="jet")
    with pytest.raises(ValueError, match="percentiles"):
        E.colorize_depth(d, percentiles=(98, 2))


def test_colorize_depth_outliers_do_not_set_the_range():
    d = torch.linspace(4, 6, 400).reshape(20, 20)
    d[0, 0] = 1e6  # one wild pixel
    img = E.colorize_depth(d, cmap="viridis", near_high=False, use_matplotlib=False)
    top = np.round(E.apply_colormap(np.array([1.0]), "viridis", use_matplotlib=False)[0] * 255)
    assert (np.abs(img.reshape(-1, 3).astype(int) - top).max(1) <= 1).sum() < 20  # only the p98 tail saturates


# ------------------------------------------------------------------ video


def _frames(T=5, H=16, W=24):
    f = torch.zeros(T, H, W, 3, dtype=torch.uint8)
    for t in range(T):
        f[t, :, : (t + 1) * 4] = 255  # distinct frames (Pillow merges identical neighbours)
    return f


def test_write_gif_frame_count_and_size(tmp_path):
    from PIL import Image
    path = E.write_video(_frames(), tmp_path / "a.gif", fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (24, 16)
    path = E.write_video(_frames().permute(0, 3, 1, 2).float() / 255, tmp_path / "b.gif")  # [T,3,H,W] floats
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (24, 16)
    assert sorted(os.listdir(tmp_path)) == ["a.gif", "b.gif"]


def test_write_mp4_frame_count_and_size(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    path = E.write_video(_frames(T=6), tmp_path / "a.mp4", fps=12)
    r = imageio.get_reader(path)
    frames = [f for f in r]
    r.close()
    assert len(frames) == 6 and frames[0].shape == (16, 24, 3)
    assert abs(int(frames[5][8, 20, 0]) - 255) < 40 and int(frames[0][8, 20, 0]) < 40  # content survives
    assert os.listdir(tmp_path) == ["a.mp4"]


def test_write_video_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown video format '.avi'"):
        E.write_video(_frames(), tmp_path / "a.avi")
    with pytest.raises(ValueError, match="even"):
        E.write_video(_frames(H=15), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="3 colour channels"):
        E.write_video(torch.zeros(2, 8, 8, 4, dtype=torch.uint8), tmp_path / "a.gif")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        E.write_video(_frames(), tmp_path / "nope" / "a.gif")
    assert os.listdir(tmp_path) == []
