"""Cameras for training, synthetic scenes, the folder dataset (real 16-bit PNGs) and its errors,
and the step-indexed data order."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr import cameras
from g3dr.config import apply_overrides, preset
from g3dr.data import DataError, FolderDataset, global_batch
from g3dr.depthio import read_depth_png, write_depth_png
from g3dr.synthetic import SyntheticDataset, cast, density_field, make_scene, render_view
from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays


def test_novel_view_samplers_follow_the_official_and_paper_rules():
    cfg = preset("official")
    g = torch.Generator().manual_seed(0)
    yaw, pitch = cameras.sample_novel(cfg, 0, 4000, g)
    assert (yaw - math.pi / 2).abs().max() <= math.pi / 24 + 1e-6 and (yaw - math.pi / 2).abs().max() > math.pi / 26
    assert (pitch - math.pi / 2).abs().max() <= math.pi / 18 + 1e-6
    yaw, _ = cameras.sample_novel(cfg, cfg.train.steps, 4000, g)
    assert (yaw - math.pi / 2).abs().max() <= math.pi / 6 + 1e-6 and (yaw - math.pi / 2).abs().max() > math.pi / 6.5
    paper = preset("paper")
    yaw, pitch = cameras.sample_novel(paper, 0, 20000, g)
    assert abs(yaw.mean().item() - math.pi / 2) < 0.01 and abs(yaw.std().item() - 0.3) < 0.01
    assert abs(pitch.std().item() - 0.15) < 0.005


def test_canonical_rays_are_g3dr_rays():
    cfg = preset("tiny")
    o, d = cameras.canonical_rays(cfg, 2)
    o2, d2 = g3dr_rays(g3dr_cam2world(math.pi / 2, math.pi / 2, 5.0), 18.0, cfg.model.image_size)
    assert o.shape == (2, 256, 3) and torch.equal(d[1], d2[0]) and torch.equal(o[0], o2[0])


def test_synthetic_ground_truth_is_consistent():
    scene = make_scene(3, seed=1)
    v = render_view(scene, resolution=32)
    assert v["mask"].all()  # every canonical ray hits the wall or an object
    assert 4.0 <= v["depth"].min() and v["depth"].max() < 6.0 and 0 <= v["rgb"].min() and v["rgb"].max() <= 1
    # the hit points lie on the surface: the occupancy field crosses 0.5 there
    o, d = g3dr_rays(g3dr_cam2world(math.pi / 2 + 0.3, math.pi / 2 - 0.1), 18.0, 24)
    hit = cast(scene, o[0].double(), d[0].double())
    pts = hit["points"][hit["mask"]]
    dirs = d[0].double()[hit["mask"]]
    before = density_field(scene, pts - 0.02 * dirs)
    after = density_field(scene, pts + 0.005 * dirs)
    assert (before < 0.5).float().mean() > 0.98 and (after > 0.5).float().mean() > 0.98
    # deterministic in (seed, index), different across indices
    assert torch.equal(render_view(make_scene(3, 1), resolution=8)["rgb"], render_view(make_scene(3, 1), resolution=8)["rgb"])
    assert not torch.equal(render_view(make_scene(4, 1), resolution=8)["depth"],
                           render_view(make_scene(3, 1), resolution=8)["depth"])


def test_synthetic_dataset_flip_convention():
    ds = SyntheticDataset(3, 16)
    a, b = ds[1], ds[1 + 3]
    assert torch.equal(a["image"].flip(-1), b["image"]) and torch.equal(a["depth"].flip(-1), b["depth"])


def _write_pair(folder, name, size=(20, 24), depth_bits=16, depth_size=None):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{name}.png")
    ds = depth_size or size
    d = torch.linspace(4.2, 5.8, ds[0]).expand(ds[1], ds[0]).contiguous()
    if depth_bits == 16:
        write_depth_png(folder / f"{name}_depth.png", d)
    else:
        Image.fromarray((rng.integers(0, 255, (ds[1], ds[0]), dtype=np.uint8))).save(folder / f"{name}_depth.png")
    return d


def test_folder_dataset_reads_16_bit_depth(tmp_path):
    (tmp_path / "sub").mkdir()
    d = _write_pair(tmp_path / "sub", "a", size=(24, 24))
    assert (tmp_path / "sub" / "a_depth.png").exists()
    raw = np.array(Image.open(tmp_path / "sub" / "a_depth.png"))
    assert raw.dtype == np.uint16 and raw.max() > 255  # really 16 bits on disk
    torch.testing.assert_close(read_depth_png(tmp_path / "sub" / "a_depth.png"), d, atol=2 / 65536, rtol=0)
    ds = FolderDataset(tmp_path, size=12)
    item = ds[0]
    assert item["image"].shape == (3, 12, 12) and item["depth"].shape == (1, 12, 12)
    assert 4.2 <= item["depth"].min() < 4.4 and 5.6 < item["depth"].max() <= 5.8
    torch.testing.assert_close(ds[1]["depth"], item["depth"].flip(-1))  # index n + i: flipped


@pytest.mark.parametrize("case,match", [("missing", "missing depth"), ("eight_bit", "8-bit"),
                                        ("mismatch", "must match"), ("corrupt", "cannot read image"),
                                        ("empty", "no images")])
def test_folder_dataset_errors_name_the_file(tmp_path, case, match):
    if case == "missing":
        Image.new("RGB", (8, 8)).save(tmp_path / "lonely.jpg")
    elif case == "eight_bit":
        _write_pair(tmp_path, "x", depth_bits=8)
    elif case == "mismatch":
        _write_pair(tmp_path, "x", size=(20, 24), depth_size=(10, 12))
    elif case == "corrupt":
        _write_pair(tmp_path, "x")
        (tmp_path / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=match) as e:
        ds = FolderDataset(tmp_path, size=8)
        ds[0]
    if case != "empty":
        assert str(tmp_path) in str(e.value)


def test_folder_dataset_skip_bad(tmp_path):
    _write_pair(tmp_path, "good")
    _write_pair(tmp_path, "bad8", depth_bits=8)
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.jpg")
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = FolderDataset(tmp_path, size=8, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 2 and any("bad8" in k for k in ds.skipped)


def test_global_batch_is_a_pure_function_split_across_ranks():
    full = global_batch(5, 10, 8, seed=3, flip=True)
    assert full == global_batch(5, 10, 8, seed=3, flip=True)
    assert all(0 <= i < 20 for i in full)
    # an epoch visits every item once (before flips)
    seen = sorted(i % 10 for s in range(5) for i in global_batch(s, 10, 2, seed=3, flip=False))
    assert seen == list(range(10))
    from g3dr.data import StepBatchSampler
    one = list(StepBatchSampler(10, 8, 7, 2, seed=3, flip=True))
    two = [list(StepBatchSampler(10, 4, 7, 2, seed=3, flip=True, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*two)] == one
