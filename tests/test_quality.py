"""The learning-3D work: plane layout, training diagnostics on cases with known answers, the free-space
term, held-out scoring, fine-tuning (--init), short-run outputs, and the shipped model itself."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.cli import main
from g3dr.config import apply_overrides, preset
from g3dr.depthio import write_depth_png
from g3dr.heldout import covisible, held_out_indices, opacity_in_front, score_scene
from g3dr.cameras import input_view_regions
from g3dr.losses import Criterion, carve_loss, free_space_loss
from g3dr.metrics import depth_split
from g3dr.model import G3DR, PlaneLift, image_plane_orientation, orient_planes, splat_planes
from g3dr.synthetic import cast, make_scene, render_view
from g3dr.train import init_weights, interval, train
from g3dr_kernels import reference
from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "g3dr-fast-synthetic.safetensors"


@pytest.fixture(autouse=True)
def _quiet_random_init_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM.*")
        yield


# ------------------------------------------------------------------------------------ plane layout
def _index_grid(H):
    r = torch.arange(H, dtype=torch.float64)
    return torch.stack([r[:, None].expand(H, H), r[None, :].expand(H, H)])  # channels: row index, column index


@pytest.mark.parametrize("axes", ["xyz", "eg3d"])
def test_image_layout_lines_planes_up_with_the_image(axes):
    """Sampling the turned grids at the canonical pixels' 3D points: a plane axis driven by image rows
    reads back the grid's row index increasing with the image row, likewise columns; the leftover grid
    axis increases with depth along the view."""
    H, n = 32, 8
    planes = orient_planes(_index_grid(H)[None, None].expand(1, 3, 2, H, H), image_plane_orientation(axes, 5.0, 18.0))
    o, d = g3dr_rays(g3dr_cam2world(math.pi / 2, math.pi / 2, 5.0, dtype=torch.float64), 18.0, n)

    def read(t):
        uv = reference.project(o + t * d, 2.0, axes)[0]                       # [3, N, 2]
        s = torch.nn.functional.grid_sample(planes[0], uv[:, None], align_corners=False)  # [3, 2, 1, N]
        return s[:, :, 0].reshape(3, 2, n, n)                                 # plane, channel, image row, col

    near, far = read(4.7), read(5.3)
    for p in range(3):
        for ch in range(2):
            along_rows = near[p, ch, -1, :].mean() - near[p, ch, 0, :].mean()
            along_cols = near[p, ch, :, -1].mean() - near[p, ch, :, 0].mean()
            along_depth = (far[p, ch] - near[p, ch]).mean()
            moves = {"row": along_rows, "col": along_cols, "depth": along_depth}
            axis = max(moves, key=lambda k: abs(float(moves[k])))
            assert moves[axis] > 0, (axes, p, ch, moves)  # never flipped
            if axis != "depth":  # a grid axis that follows an image axis follows the one it is named after
                assert axis == ("row" if ch == 0 else "col"), (axes, p, ch, moves)
    if axes == "xyz":  # the (y, z) plane faces the camera: both grid axes follow the image
        assert abs(float((far[2] - near[2]).mean())) < 0.5


def test_native_layout_is_the_generator_output():
    torch.manual_seed(0)
    cfg = preset("tiny")
    m = G3DR(cfg).eval()
    img, dep = torch.rand(1, 3, 16, 16), torch.full((1, 1, 16, 16), 5.0)
    assert m.orientation is None
    assert torch.equal(m.planes(img, dep), m.generator(img * 2 - 1, dep).float())
    cfg = apply_overrides(cfg, ["model.plane_layout=image", "render.plane_axes=xyz"])
    torch.manual_seed(0)
    m2 = G3DR(cfg).eval()
    grid = m2.generator(img * 2 - 1, dep).float()
    assert torch.equal(m2.planes(img, dep), orient_planes(grid, m2.orientation))
    assert not torch.equal(m2.planes(img, dep), grid)



def test_splat_is_the_transpose_of_the_bilinear_sample():
    """<splat(f), g> == <f, sample(g)> for the renderer's sample (bilinear, align_corners=False, zeros
    outside), points inside, on the rim and outside the grid; the weights are the splat of ones."""
    torch.manual_seed(0)
    B, P, N, C, H, W = 2, 3, 60, 4, 7, 9
    f = torch.randn(B, P, N, C, dtype=torch.float64)
    uv = torch.rand(B, P, N, 2, dtype=torch.float64) * 2.4 - 1.2
    g = torch.randn(B, P, C, H, W, dtype=torch.float64)
    summed, wsum = splat_planes(f, uv, H, W)
    sample = torch.nn.functional.grid_sample(g.reshape(B * P, C, H, W), uv.reshape(B * P, 1, N, 2),
                                             align_corners=False).reshape(B, P, C, N).transpose(2, 3)
    assert torch.allclose((summed * g).sum(), (f * sample).sum(), rtol=1e-12)
    ones = torch.nn.functional.grid_sample(torch.ones(B * P, 1, H, W, dtype=torch.float64), uv.reshape(B * P, 1, N, 2),
                                           align_corners=False)
    assert torch.allclose(wsum.sum(), ones.sum(), rtol=1e-12)
    # a point on a texel centre lands on that texel alone
    one = torch.tensor([[[[(2 * 3 + 1) / W - 1, (2 * 5 + 1) / H - 1]]]], dtype=torch.float64).expand(1, 3, 1, 2)
    s1, w1 = splat_planes(torch.ones(1, 3, 1, 1, dtype=torch.float64), one, H, W)
    assert w1[0, :, 0, 5, 3].tolist() == [1.0] * 3 and w1.sum() == 3


def test_lift_layout_puts_each_pixel_at_its_depth():
    """plane_layout=lift: the lifted planes, sampled at the canonical pixels' 3D points (ray x depth), give
    back each pixel's own features where no other pixel shares its texel: on the frontal (y, z) plane for
    a flat wall, and every plane's texels follow the depth (a pixel moved deeper moves on the side planes)."""
    H = 16
    lift = PlaneLift(2, H, "xyz", 5.0, 18.0, 2.0).double()
    feats = _index_grid(H)[None, None].expand(1, 3, 2, H, H)
    depth = torch.full((1, 1, H, H), 5.3, dtype=torch.float64)
    planes, cover = lift.splat(feats, depth)
    o, d = g3dr_rays(g3dr_cam2world(math.pi / 2, math.pi / 2, 5.0, dtype=torch.float64), 18.0, H)
    uv = reference.project(o + 5.3 * d, 2.0, "xyz")[0]                                    # [3, N, 2]
    back = torch.nn.functional.grid_sample(planes[0, 2:3], uv[2:3, None], align_corners=False)[0, :, 0]
    want = feats[0, 2].reshape(2, -1)
    inner = (cover[0, 2, 0] > 0).float()
    # the frontal plane: row / column index read back to within the texel mixing of bilinear splat + sample
    assert (back - want).abs().mean() < 0.6 and (back - want).abs().max() < 1.5
    assert inner.sum() > 0.5 * H * H                                                     # the image covers the plane
    # a deeper wall: the side planes' covered texels move along the depth axis, the frontal one does not move
    planes2, cover2 = lift.splat(feats, torch.full((1, 1, H, H), 5.6, dtype=torch.float64))
    for p in (0, 1):
        assert not torch.equal(cover[0, p] > 0, cover2[0, p] > 0)
    # zero-initialised refinement: the model's planes are the lifted ones at initialisation
    assert torch.allclose(lift(feats, depth), planes)
    with pytest.raises(ValueError, match="plane lift"):
        lift.splat(feats, torch.full((1, 1, H, H + 1), 5.3, dtype=torch.float64))


def test_lift_layout_in_the_model_and_config():
    torch.manual_seed(0)
    cfg = apply_overrides(preset("tiny"), ["model.plane_layout=lift"])
    m = G3DR(cfg).eval()
    img, dep = torch.rand(1, 3, 16, 16), torch.full((1, 1, 16, 16), 5.0)
    assert m.lift is not None and m.orientation is None
    assert torch.equal(m.planes(img, dep), m.lift(m.generator(img * 2 - 1, dep).float(), dep))
    assert any(k.startswith("lift.refine") for k in m.state_dict())
    assert not any("rays_" in k for k in m.state_dict())                                # derived, not stored
    with pytest.raises(ValueError, match="plane_layout"):
        apply_overrides(preset("tiny"), ["model.plane_layout=lifted"])


# ------------------------------------------------------------------------------------ diagnostics
def test_depth_split_known_answers():
    true = torch.full((2, 10), 5.0)
    objects = torch.zeros(2, 10, dtype=torch.bool)
    objects[:, :4] = True
    perfect = depth_split(true.clone(), true, objects)
    assert perfect["depth_err_obj"] == 0 and perfect["depth_err_bg"] == 0 and perfect["fog_obj"] == 0
    sheet = true.clone()
    sheet[:, :4] = 4.5                      # an opaque sheet 0.5 in front of every object pixel
    sheet[:, 4:] = 5.2                      # the background 0.2 behind
    f = depth_split(sheet, true, objects)
    assert f["fog_obj"] == 1 and f["behind_obj"] == 0
    assert f["depth_err_obj"] == pytest.approx(0.5) and f["depth_err_bg"] == pytest.approx(0.2)
    half = true.clone()
    half[:, :2] = 4.95                      # inside the margin: not fog
    half[:, 2:4] = 4.8
    assert depth_split(half, true, objects)["fog_obj"] == pytest.approx(0.5)
    assert math.isnan(depth_split(true, true, torch.ones_like(objects))["depth_err_bg"])


def test_free_space_loss_counts_only_what_lies_in_front():
    t_mid = torch.linspace(4.0, 6.0, 21).expand(1, 4, 21)
    depth = torch.full((1, 1, 2, 2), 5.0)
    at_target = torch.zeros(1, 4, 21)
    at_target[..., 10] = 1.0                # all weight at t = 5.0
    assert free_space_loss(at_target, t_mid, depth, 0.05) == 0
    in_front = torch.zeros(1, 4, 21)
    in_front[..., 3] = 0.7                  # t = 4.3: fog
    in_front[..., 10] = 0.3
    assert free_space_loss(in_front, t_mid, depth, 0.05) == pytest.approx(0.7)


def _view_rays(yaw_deg, pitch_deg, res):
    return g3dr_rays(g3dr_cam2world(math.pi / 2 + math.radians(yaw_deg), math.pi / 2 + math.radians(pitch_deg), 5.0), 18.0,
                     res)


def test_input_view_regions_on_a_scene():
    """Known answers from a synthetic scene's true geometry: points on the input's surface are neither
    empty nor behind, 0.2 in front are empty, 0.2 behind are behind; no surface point a side view sees
    is empty (a perfect model pays no carving), and the rays that pass beside the wall end in front."""
    cfg, res = preset("fast"), 32
    scene = make_scene(1000003)
    depth = render_view(scene, resolution=res)["depth"][None]            # [1,1,H,W]
    o, d = _view_rays(0, 0, res)
    at = {off: input_view_regions(o + d * (depth.reshape(1, -1, 1) + off), depth, cfg, 0.05) for off in (-0.2, 0, 0.2)}
    assert not bool(at[0][0].any() or at[0][1].any())
    # all but the pixels beside a silhouette (compared against their 3x3 neighbourhood's nearest/farthest)
    assert float(at[-0.2][0].float().mean()) > 0.85 and not bool(at[-0.2][1].any())
    assert float(at[0.2][1].float().mean()) > 0.85 and not bool(at[0.2][0].any())
    for yaw in (-15, 15):
        o, d = _view_rays(yaw, 5, res)
        hit = cast(scene, o[0], d[0])
        surface = (o[0] + d[0] * hit["depth"][:, None])[hit["mask"]]
        empty, _ = input_view_regions(surface[None], depth, cfg, 0.05)
        assert not bool(empty.any())
        miss = ~hit["mask"]
        assert bool(miss.any())                                             # the strip beside the wall
        fog = o[0] + d[0] * 4.3                                             # a sheet in front of everything
        assert float(input_view_regions(fog[None], depth, cfg, 0.05)[0].float().mean()) > 0.95
        # the box exit of each ray: behind the input's surface where the ray hits, never where it misses
        t_exit = torch.maximum((-1 - o[0]) / d[0], (1 - o[0]) / d[0]).amin(-1) - 0.02
        _, behind = input_view_regions((o[0] + d[0] * t_exit[:, None])[None], depth, cfg, 0.05)
        assert not bool(behind[0][miss].any()) and float(behind[0][hit["mask"]].float().mean()) > 0.9


def test_carve_loss_and_the_novel_opacity_mask():
    weights = torch.zeros(1, 2, 4)
    weights[0, 0, 1], weights[0, 1, 3] = 0.8, 0.5
    empty = torch.zeros(1, 2, 4, dtype=torch.bool)
    empty[0, 0, :2] = True                                   # ray 0's first two samples lie in empty space
    assert float(carve_loss(weights, empty)) == pytest.approx(0.8 / 2)
    cfg = apply_overrides(preset("tiny"), ["loss.w_carve=2", "loss.novel_opacity=behind"])
    crit = Criterion(cfg.loss, need_lpips=False, need_clip=False)
    out = {"rgb": torch.zeros(1, 3, 1, 2), "depth": torch.zeros(1, 1, 1, 2), "opacity": torch.tensor([[[[0.25, 0.0]]]]),
           "weights": weights, "empty": empty, "ends_behind": torch.tensor([[True, False]])}
    w = {"novel": {"clip": 0, "lpips": 0, "tv": 0, "carve": 2.0}, "opacity": 1.0}
    terms = crit("novel", out, torch.zeros(1, 3, 1, 2), torch.zeros(1, 1, 1, 2), w)
    assert float(terms["carve"]) == pytest.approx(0.8)
    assert float(terms["opacity"]) == pytest.approx(0.75 / 2)  # ray 1 passes beside the surface: not asked to hit
    del out["ends_behind"]                                     # novel_opacity=all: every ray should end on a surface
    assert float(crit("novel", out, torch.zeros(1, 3, 1, 2), torch.zeros(1, 1, 1, 2), w)["opacity"]) == \
        pytest.approx((0.75 + 1.0) / 2)


def test_covisible_and_opacity_in_front():
    scene = make_scene(3)
    c2w = g3dr_cam2world(math.pi / 2, math.pi / 2, 5.0, dtype=torch.float64)
    o, d = g3dr_rays(c2w, 18.0, 24)
    hit = cast(scene, o[0], d[0])
    assert bool(covisible(scene, hit["points"], hit["mask"], 5.0, 18.0, 24).eq(hit["mask"]).all())  # the input view
    c2w = g3dr_cam2world(math.pi / 2 + math.radians(30), math.pi / 2, 5.0, dtype=torch.float64)
    o, d = g3dr_rays(c2w, 18.0, 24)
    hit = cast(scene, o[0], d[0])
    cov = covisible(scene, hit["points"], hit["mask"], 5.0, 18.0, 24)
    assert 0.3 < float(cov.double().mean()) < 1.0     # a side view sees parts the input does not
    # opacity in front: a model whose density is huge everywhere is opaque before any surface; a
    # model with no density is transparent
    m = G3DR(preset("tiny")).eval()
    planes = torch.zeros(1, 3, 8, 16, 16)
    o, d = g3dr_rays(g3dr_cam2world(math.pi / 2, math.pi / 2, 5.0), 18.0, 4)
    stop = torch.full((1, 16), 5.5)
    with torch.no_grad():
        m.decoder.bias2.zero_()
        m.decoder.bias2[0] = 50.0
        assert float(opacity_in_front(m, planes, o, d, stop).min()) > 0.99
        m.decoder.bias2[0] = -50.0
        assert float(opacity_in_front(m, planes, o, d, stop).max()) < 1e-6


# ------------------------------------------------------------------------------------ training
def _tiny(*extra):
    return apply_overrides(preset("tiny"), ["train.log_every=1", *extra])


def test_short_run_writes_images_curves_and_checkpoints(tmp_path):
    cfg = _tiny("train.steps=4", "train.image_every=500", "train.save_every=500")
    train(cfg, tmp_path / "run", progress=False)
    imgs = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
    assert imgs and imgs[-1] == "step_00000004.png"
    assert Image.open(tmp_path / "run" / "curves.png").size[0] > 200
    assert (tmp_path / "run" / "checkpoints" / "step_00000004.pt").is_file()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "stats.jsonl")]
    canon = [r for r in rows if r["branch"] == "canon"]
    assert canon and all("depth_err_obj" in r and "fog_obj" in r and "opacity_mean" in r for r in canon)
    assert interval(500, 4, 6) == 1 and interval(250, 3000, 6) == 250


def test_novel_steps_carve(tmp_path):
    cfg = _tiny("train.steps=2", "schedule.p_novel_max=1", "schedule.p_novel_ramp=0", "loss.w_carve=1",
                "loss.novel_opacity=behind", "train.image_every=500", "train.save_every=500")
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "stats.jsonl")]
    assert [r["branch"] for r in rows] == ["novel", "novel"] and all(r["carve"] > 0 for r in rows)


def test_init_starts_from_the_weights_with_a_fresh_optimizer(tmp_path):
    src = _tiny("train.steps=3")
    train(src, tmp_path / "src", progress=False)
    # lr so small that one Adam step cannot move a parameter measurably: the run's weights are the source's
    cfg = _tiny("train.steps=1", "schedule.lr_schedule=constant", "schedule.lr=1e-12", "train.seed=7")
    train(cfg, tmp_path / "ft", progress=False, init=str(tmp_path / "src"))
    a = torch.load(tmp_path / "src" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-8), k
    steps = {int(s["step"]) for s in b["optimizer"]["state"].values()}
    assert steps == {1} and b["step"] == 1          # a fresh optimizer: one update, not 3 + 1
    fresh = G3DR(cfg)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in a["model"].items())
    with pytest.raises(ValueError, match="do not fit"):
        init_weights(G3DR(apply_overrides(preset("tiny"), ["model.plane_channels=4"])), tmp_path / "src")


def test_max_steps_sets_the_schedule(tmp_path):
    main(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "--quiet", "--max-steps", "2"])
    ck = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["step"] == 2 and ck["config"]["train"]["steps"] == 2


def test_reconstruct_takes_paths(tmp_path):
    torch.manual_seed(0)
    m = G3DR(preset("tiny")).eval()
    v = render_view(make_scene(1), resolution=16)
    img = (v["rgb"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    write_depth_png(tmp_path / "x_depth.png", v["depth"][0].float())
    from g3dr.data import load_pair
    im, dp = load_pair(tmp_path / "x.png", tmp_path / "x_depth.png", 16)
    assert torch.equal(m.reconstruct(str(tmp_path / "x.png"), tmp_path / "x_depth.png"), m.reconstruct(im, dp))
    with pytest.raises(TypeError):
        m.reconstruct(str(tmp_path / "x.png"), dp)


# ------------------------------------------------------------------------------------ the shipped model
@pytest.mark.skipif(not SHIPPED.is_file(), reason=f"{SHIPPED} not in this checkout")
def test_shipped_model_beats_a_flat_plane_on_a_held_out_scene():
    from g3dr.infer import load
    model = load(SHIPPED, device="cpu")
    s = score_scene(model, make_scene(held_out_indices(1)[0], model.cfg.data.synthetic_seed))
    assert s["depth_med_obj"] < s["flat_med_obj"] / 3
    assert s["psnr_covis"] > 20
