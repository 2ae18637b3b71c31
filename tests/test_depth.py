"""g3dr.depth: monocular depth for a folder, offline, with a tiny random-initialised Depth Anything model.

The tiny model (about 40K parameters) is built from configs, saved with `save_pretrained` to a temp
dir and loaded back through `load_depth_model`, as a user's downloaded model would be.
The conversion's ordering is checked with a fake model whose output is an exact inverse depth.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from g3dr.depth import (DEPTH_SPAN, DepthModelNotFoundError, estimate_depth_folder,  # noqa: E402
                        list_images, load_depth_model, to_g3dr_depth)
from g3dr.depthio import DEPTH_OFFSET, read_depth_png  # noqa: E402

STEP = 2.0 / 65536  # one 16-bit step, in depth units


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            patch_size=14, image_size=28, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    # initializer_range 0.2: the default 0.02 gives outputs ~1e-9, a poor test of the value path
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
                              fusion_hidden_size=8, head_hidden_size=4, patch_size=14, initializer_range=0.2)
    model = DepthAnythingForDepthEstimation(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) < 100_000
    # Depth Anything V2's own processor settings, at 28 px instead of 518 so the test stays fast
    proc = DPTImageProcessor(do_resize=True, size={"height": 28, "width": 28}, keep_aspect_ratio=True,
                             ensure_multiple_of=14, do_pad=False, resample=3)
    d = tmp_path_factory.mktemp("depth_model")
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def estimator(model_dir):
    return load_depth_model(model_dir, device="cpu")


def _write_image(path, h, w, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "imgs"
    _write_image(d / "a.jpg", 20, 30, 0)
    _write_image(d / "b.png", 20, 30, 1)
    _write_image(d / "sub" / "c.jpeg", 17, 23, 2)
    (d / "notes.txt").write_text("not an image")
    return d


def test_load_depth_model_kind_and_output_size(estimator):
    assert estimator.kind == "inverse"  # a relative Depth Anything model outputs disparity
    ims = [Image.new("RGB", (30, 20), (10, 20, 30)), Image.new("RGB", (23, 17), (200, 20, 30))]
    out = estimator.predict(ims)
    assert [tuple(p.shape) for p in out] == [(20, 30), (17, 23)]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in out)


def test_dpt_layout_loads(tmp_path):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    # the Intel/dpt-large layout (ViT backbone inside DPT), tiny
    cfg = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=16, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8,
                    backbone_out_indices=[0, 1, 2, 3], initializer_range=0.2)
    DPTForDepthEstimation(cfg).save_pretrained(tmp_path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path)
    est = load_depth_model(tmp_path, device="cpu")
    assert est.kind == "inverse" and type(est.model).__name__ == "DPTForDepthEstimation"
    assert [tuple(p.shape) for p in est.predict([Image.new("RGB", (40, 24))])] == [(24, 40)]


def test_metric_models_are_depth_kind():
    from transformers import DepthAnythingConfig

    from g3dr.depth import _infer_kind
    assert _infer_kind(DepthAnythingConfig(depth_estimation_type="metric")) == "depth"
    assert _infer_kind(DepthAnythingConfig()) == "inverse"


def test_folder_names_encoding_and_values(folder, model_dir, estimator):
    s = estimate_depth_folder(folder, model_dir=model_dir, batch_size=2, device="cpu", progress=False)
    assert s.ok and not s.skipped and len(s.done) == 3, str(s)
    expected = {folder / "a_depth.png", folder / "b_depth.png", folder / "sub" / "c_depth.png"}
    assert set(s.done) == expected
    assert not list(folder.rglob("*.tmp*"))  # atomic writes leave no temp files
    for img_name, dep in (("a.jpg", "a_depth.png"), ("sub/c.jpeg", "sub/c_depth.png")):
        with Image.open(folder / dep) as im:
            assert im.mode.startswith("I;16") or im.mode == "I"  # 16-bit greyscale
        with Image.open(folder / img_name) as im:
            rgb = im.convert("RGB")
        depth = read_depth_png(folder / dep)
        assert tuple(depth.shape) == (rgb.size[1], rgb.size[0])
        # 16-bit round trip: what was written is the converted prediction, to within half a 16-bit step
        want = to_g3dr_depth(estimator.predict([rgb])[0], "inverse")
        assert (depth - want).abs().max() <= STEP * 0.51 + 1e-5 * 2  # + batch-vs-single float noise
        assert depth.min() >= DEPTH_OFFSET and depth.max() < DEPTH_OFFSET + 2.0
        assert depth.max() - depth.min() > 1.0  # percentile normalisation spreads a non-constant map


def test_resumable_and_overwrite(folder, model_dir, estimator):
    first = estimate_depth_folder(folder, model=estimator, progress=False)
    assert len(first.done) == 3
    stamp = {p: os.stat(p).st_mtime_ns for p in first.done}
    again = estimate_depth_folder(folder, model=estimator, progress=False)
    assert not again.done and len(again.skipped) == 3 and again.ok
    assert {p: os.stat(p).st_mtime_ns for p in first.done} == stamp
    # resuming never needs the model: a missing model dir is fine when everything is done
    assert len(estimate_depth_folder(folder, model_dir=folder / "nope", progress=False).skipped) == 3
    (folder / "b_depth.png").unlink()
    part = estimate_depth_folder(folder, model=estimator, progress=False)
    assert part.done == [folder / "b_depth.png"] and len(part.skipped) == 2
    assert len(estimate_depth_folder(folder, model=estimator, overwrite=True, progress=False).done) == 3


def test_out_dir_mirrors_tree(folder, tmp_path, estimator):
    out = tmp_path / "out"
    s = estimate_depth_folder(folder, out, model=estimator, progress=False)
    assert set(s.done) == {out / "a_depth.png", out / "b_depth.png", out / "sub" / "c_depth.png"}
    assert not list(folder.rglob("*_depth.png"))


def test_bad_images_are_reported_not_fatal(folder, estimator):
    (folder / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (folder / "a.png").write_bytes((folder / "b.png").read_bytes())  # a.jpg and a.png -> the same a_depth.png
    s = estimate_depth_folder(folder, model=estimator, progress=False)
    assert len(s.done) == 3
    reasons = dict(s.failed)
    assert set(reasons) == {folder / "broken.jpg", folder / "a.png"}
    assert "not a readable image" in reasons[folder / "broken.jpg"]
    assert "a_depth.png" in reasons[folder / "a.png"]
    assert "broken.jpg" in str(s)


def test_list_images_skips_depth_maps_and_temp_files(folder):
    (folder / "a_depth.png").write_bytes(b"")
    (folder / "x_depth.png.tmp.png").write_bytes(b"")
    assert [p.name for p in list_images(folder)] == ["a.jpg", "b.png", "c.jpeg"]


class _InverseDepthModel:
    """A perfect relative-inverse-depth model: the image's red channel encodes true depth, output is
    a * (1 / depth) + b with an arbitrary scale and shift, as Depth Anything / DPT output."""
    kind = "inverse"

    def predict(self, images):
        out = []
        for im in images:
            true_depth = 1.0 + torch.from_numpy(np.asarray(im, dtype=np.float32)[..., 0]) / 25.5  # [1, 11]
            out.append(37.0 / true_depth + 5.0)
        return out


def test_conversion_ordering_on_known_scene(tmp_path):
    # a ramp floor receding from the bottom row (near) to the top (far), and a near box in the middle
    h, w = 24, 32
    true_depth = np.repeat(np.linspace(10.0, 2.0, h)[:, None], w, axis=1)
    true_depth[8:16, 10:22] = 1.0
    red = np.round((true_depth - 1.0) * 25.5).astype(np.uint8)
    img = np.stack([red, np.zeros_like(red), np.zeros_like(red)], axis=-1)
    Image.fromarray(img).save(tmp_path / "scene.png")
    s = estimate_depth_folder(tmp_path, model=_InverseDepthModel(), progress=False)
    assert s.ok and len(s.done) == 1
    got = read_depth_png(tmp_path / "scene_depth.png").numpy()
    coded = 1.0 + red.astype(np.float64) / 25.5  # the true depth the fake model sees
    # larger = farther: the written depth is a non-decreasing function of the true depth
    order = np.argsort(coded.ravel(), kind="stable")
    assert np.all(np.diff(got.ravel()[order]) >= -1e-6)
    assert got[12, 16] < got[20, 5] < got[2, 5]  # box nearer than the near floor, nearer than the far floor
    assert got[12, 16] == pytest.approx(DEPTH_OFFSET, abs=STEP)  # nearest maps to 4
    assert got[0, 0] == pytest.approx(DEPTH_OFFSET + DEPTH_SPAN, abs=STEP)  # farthest to the top of the range


def test_to_g3dr_depth_mapping():
    disp = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    inv = to_g3dr_depth(disp, "inverse", lo_pct=0, hi_pct=100)
    assert torch.allclose(inv, DEPTH_OFFSET + DEPTH_SPAN * (1 - disp / 4))  # documented formula, exactly
    dep = to_g3dr_depth(disp, "depth", lo_pct=0, hi_pct=100)
    assert torch.allclose(dep, DEPTH_OFFSET + DEPTH_SPAN * disp / 4)
    # constant input: no division by zero, the plane through the origin (depth 5)
    assert torch.equal(to_g3dr_depth(torch.full((3, 4), 7.0)), torch.full((3, 4), 5.0))
    assert torch.equal(to_g3dr_depth(np.zeros((2, 2), np.float32)), torch.full((2, 2), 5.0))
    # tiny-scale outputs (a model's scale is arbitrary) are not mistaken for constant maps
    assert to_g3dr_depth(disp * 1e-9, lo_pct=0, hi_pct=100).std() > 0.5


def test_to_g3dr_depth_robust_to_outliers_and_nan():
    disp = torch.linspace(0, 1, 10_000).reshape(100, 100)
    disp[0, 0] = 1e6      # one specular speck
    disp[0, 1] = float("nan")
    d = to_g3dr_depth(disp)
    assert torch.isfinite(d).all() and d.min() >= DEPTH_OFFSET and d.max() <= DEPTH_OFFSET + DEPTH_SPAN
    assert d[0, 0] == DEPTH_OFFSET          # the outlier is clipped to nearest
    assert d[0, 1] == DEPTH_OFFSET + DEPTH_SPAN  # NaN -> far
    assert d[1:].max() - d[1:].min() > 1.9  # the rest still spans the range (min-max would squash it to ~0)


@pytest.mark.parametrize("bad, err", [
    (torch.zeros(2, 3, 4), ValueError), (torch.zeros(0, 3), ValueError),
    (torch.full((2, 2), float("nan")), ValueError), ([[1.0, 2.0]], TypeError)])
def test_to_g3dr_depth_bad_input(bad, err):
    with pytest.raises(err, match="to_g3dr_depth"):
        to_g3dr_depth(bad)


def test_to_g3dr_depth_bad_options():
    with pytest.raises(ValueError, match="kind"):
        to_g3dr_depth(torch.rand(2, 2), kind="disparity")
    with pytest.raises(ValueError, match="lo_pct"):
        to_g3dr_depth(torch.rand(2, 2), lo_pct=50, hi_pct=10)


def test_missing_model_dir_error(tmp_path, folder):
    missing = tmp_path / "weights" / "depth-anything"
    with pytest.raises(DepthModelNotFoundError) as e:
        load_depth_model(missing)
    msg = str(e.value)
    for part in (str(missing), "config.json", "preprocessor_config.json", "model.safetensors",
                 "depth-anything/Depth-Anything-V2-Small-hf", "huggingface-cli download"):
        assert part in msg
    with pytest.raises(DepthModelNotFoundError, match="depth model directory"):  # through the folder function
        estimate_depth_folder(folder, model_dir=missing, progress=False)


def test_incomplete_model_dir_error(tmp_path, model_dir):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    with pytest.raises(DepthModelNotFoundError, match="incomplete") as e:
        load_depth_model(partial)
    assert f"{partial} is incomplete (missing: preprocessor_config.json, weights (" in str(e.value)  # not config.json


def test_folder_errors(tmp_path, estimator):
    with pytest.raises(FileNotFoundError, match="not found"):
        estimate_depth_folder(tmp_path / "nope", model=estimator)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x_depth.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no images"):
        estimate_depth_folder(tmp_path / "empty", model=estimator)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_depth_folder(tmp_path, model=estimator, batch_size=0)
    with pytest.raises(ValueError, match="model_dir"):
        estimate_depth_folder(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        estimate_depth_folder(tmp_path, model=estimator, kind="disparity")


def test_unwritable_output_folder(folder, tmp_path, estimator):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")  # fails for root too, unlike chmod
    with pytest.raises(PermissionError, match="cannot create output folder"):
        estimate_depth_folder(folder, blocker / "out", model=estimator, progress=False)
    assert not list(folder.rglob("*_depth.png"))  # nothing half-written


def test_depth_cli_and_render_with_estimated_depth(folder, model_dir, tmp_path, capsys):
    """`g3dr depth` writes a training folder; `g3dr render --depth-model` estimates depth on the fly."""
    from g3dr.cli import main
    main(["depth", str(folder), "--model", str(model_dir), "--batch-size", "2", "--device", "cpu"])
    assert "3 written" in capsys.readouterr().out
    assert read_depth_png(folder / "a_depth.png").shape == (20, 30)
    main(["depth", str(folder), "--model", str(model_dir), "--device", "cpu"])
    assert "3 skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["depth", str(folder), "--model", str(tmp_path / "nope"), "--overwrite"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    import warnings
    from g3dr.config import apply_overrides, preset
    from g3dr.train import train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(apply_overrides(preset("tiny"), ["train.steps=1"]), tmp_path / "run", progress=False)
    (folder / "a_depth.png").unlink()
    main(["render", "--ckpt", str(tmp_path / "run"), "--input", str(folder / "a.jpg"), "--depth-model", str(model_dir),
          "--out", str(tmp_path / "r"), "--frames", "2", "--n-coarse", "4", "--n-fine", "4", "--device", "cpu"])
    assert (tmp_path / "r" / "a" / "video.gif").is_file()
