"""`g3dr.evaluate`: evaluate() on a tiny checkpoint (complete eval.json), known answers through the
same code path (the ground truth scored against itself, and a shifted copy), folder data, the
ablation runner on a micro budget, and bad input."""
import json
import math
import warnings

import pytest
import torch

from g3dr import metrics as M
from g3dr.config import apply_overrides, preset
from g3dr.ablation import ablation
from g3dr.evaluate import ALL_METRICS, GroundTruth, evaluate, format_table
from g3dr.export import density_grid
from g3dr.train import train

# tiny sizes: 16x16 views, 2-3 views, a 16^3 geometry grid, a few hundred surface points
SMALL = dict(n_scenes=1, yaw_offsets=(0.0, 0.3), pitch_offsets=(0.0,), geometry_resolution=16, n_points=300,
             progress=False)
NO_LPIPS_TRAIN = ["loss.w_lpips_canon=0", "loss.w_lpips_novel=0"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM.*")
        yield


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(apply_overrides(preset("tiny"), ["train.steps=1", *NO_LPIPS_TRAIN]), d, progress=False)
    return d


class TinyExtractor(torch.nn.Module):
    """A stand-in for Inception (no weights here): images [B,3,H,W] -> features [B,8]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.num_features = 8

    def forward(self, x):
        return self.conv(x.float()).mean((2, 3))


def test_evaluate_tiny_checkpoint_writes_complete_eval_json(tiny_run, tmp_path):
    from g3dr.infer import load
    model = load(tiny_run, device="cpu")
    r = model.cfg.render
    planes = model.reconstruct(torch.rand(1, 3, 16, 16), torch.full((1, 1, 16, 16), 5.0))
    dens = density_grid(planes, model.decoder, 16, levels=r.levels, density_bias=r.density_bias)
    iso = float(dens.median())  # an untrained density never reaches 10: pick a level it crosses
    res = evaluate(tiny_run, "synthetic", ALL_METRICS, sigma_scales=(1, 10), out=tmp_path, device="cpu",
                   inception=TinyExtractor(), iso=iso, **SMALL)
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["metrics"].keys() == res["metrics"].keys()
    expected = {"psnr", "ssim", "lpips", "depth_abs_mean", "depth_abs_median", "psnr_canonical", "nfs_canonical",
                "nfs_novel", "depth_accuracy_canonical", "depth_accuracy_novel", "iou", "chamfer", "fscore",
                "fid", "kid", "inception_score"}
    assert expected <= set(on_disk["metrics"]), expected - set(on_disk["metrics"])
    for k in expected:
        v = on_disk["metrics"][k]
        assert isinstance(v, float) and math.isfinite(v), (k, v)
    assert 1 <= on_disk["metrics"]["nfs_canonical"] <= 64 and 0 <= on_disk["metrics"]["iou"] <= 1
    assert set(on_disk["sigma_scaling"]) == {"1", "10"}
    # the density scale reaches the renderer: the renders (and their depth errors) change
    assert on_disk["sigma_scaling"]["10"]["depth_abs_mean"] != on_disk["sigma_scaling"]["1"]["depth_abs_mean"]
    assert [(v["yaw"], v["pitch"]) for v in on_disk["per_view"]] == [(0.0, 0.0), (0.3, 0.0)]
    assert "RANDOM" in on_disk["notes"]["lpips"]          # tiny preset: allow_random_init
    assert on_disk["meta"]["nfs_bounds"] == [4.0, 6.0]
    text = format_table(res)
    assert "PSNR (novel)" in text and "sigma x" in text and "note [lpips]" in text


def test_ground_truth_scores_perfectly_through_the_same_path():
    cfg = preset("tiny")
    res = evaluate(GroundTruth(cfg), metrics=("psnr", "ssim", "depth", "nfs", "depth_accuracy", "geometry",
                                              "sigma_scaling"), sigma_scales=(1, 10), **SMALL)
    m = res["metrics"]
    assert m["psnr"] == math.inf and m["psnr_canonical"] == math.inf
    assert m["ssim"] == pytest.approx(1.0)
    assert m["depth_abs_mean"] == 0 and m["depth_abs_median"] == 0
    assert m["depth_accuracy_canonical"] == pytest.approx(0, abs=1e-12)
    assert m["iou"] == 1.0 and m["chamfer"] == 0.0 and m["fscore"] == 1.0
    assert res["sigma_scaling"]["10"] == res["sigma_scaling"]["1"]  # opaque surfaces: scaling changes nothing
    # NFS of the true canonical depth, computed directly (the wall beyond the box edge is clamped to 6)
    from g3dr.synthetic import canonical_rgbd
    _, depth = canonical_rgbd(10 ** 6, 0, 16)
    assert m["nfs_canonical"] == pytest.approx(M.nfs(depth[0].clamp(max=6.0), 4.0, 6.0))
    assert "inf" in format_table(res)
    assert res["notes"] == {}


class ShiftedTruth(GroundTruth):
    """The ground truth with every depth 0.1 farther: a known depth error, same colours."""

    def render(self, state, yaw, pitch, resolution, sigma_scale=1.0):
        out = super().render(state, yaw, pitch, resolution, sigma_scale)
        return {**out, "depth": out["depth"] + 0.1}


def test_shifted_depth_gives_the_known_error():
    res = evaluate(ShiftedTruth(preset("tiny")), metrics=("psnr", "depth", "depth_accuracy"), **SMALL)
    m = res["metrics"]
    assert m["depth_abs_mean"] == pytest.approx(0.1, abs=1e-5)
    assert m["depth_abs_median"] == pytest.approx(0.1, abs=1e-5)
    assert m["depth_accuracy_novel"] == pytest.approx(0, abs=1e-9)  # normalised depth: a shift is invisible
    assert m["psnr"] == math.inf
    assert "iou" not in m and "nfs_canonical" not in m  # only what was asked for


def test_folder_data_scores_what_needs_no_truth(tiny_run, tmp_path):
    from PIL import Image

    from g3dr.depthio import write_depth_png
    from g3dr.synthetic import canonical_rgbd
    for i in range(2):
        img, dep = canonical_rgbd(i, 0, 16)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp_path / f"s{i}.png")
        write_depth_png(tmp_path / f"s{i}_depth.png", dep[0].clamp(4, 5.99))
    res = evaluate(tiny_run, str(tmp_path), ("psnr", "nfs", "depth_accuracy", "fid", "geometry"), device="cpu",
                   **{**SMALL, "n_scenes": 5})
    m = res["metrics"]
    assert set(m) == {"nfs_canonical", "nfs_novel", "depth_accuracy_canonical"}
    assert res["meta"]["n_scenes"] == 2
    assert "ground truth" in res["notes"]["psnr"] and "ground truth" in res["notes"]["geometry"]
    assert "Inception" in res["notes"]["fid"] and M.INCEPTION_WEIGHTS_FILE in res["notes"]["fid"]


def test_ablation_micro_budget_writes_both_models_and_reports(tmp_path):
    rep = ablation(tmp_path / "results", tmp_path / "work", steps=2, scenes=2, batch=1, preset_name="tiny",
                   eval_scenes=1, yaw_offsets=(0.0, 0.3), pitch_offsets=(0.0,), sigma_scales=(1, 10),
                   geometry_resolution=16, n_points=300, progress=False, name="fidelity_test",
                   metrics=("psnr", "depth", "nfs", "depth_accuracy", "geometry", "sigma_scaling"))
    for v in ("kernel", "no_kernel"):
        ck = torch.load(tmp_path / "work" / "runs" / v / "checkpoints" / "last.pt", weights_only=True)
        assert ck["step"] == 2 and ck["config"]["render"]["depth_kernel"] == (v == "kernel")
        assert (tmp_path / "work" / "runs" / v / "eval.json").is_file()
    out = tmp_path / "results"
    j = json.loads((out / "fidelity_test.json").read_text())
    assert set(j["variants"]) == {"kernel", "no_kernel"} and j["meta"]["steps"] == 2
    md = (out / "fidelity_test.md").read_text()
    assert "| depth accuracy canonical" in md and "kernel | no_kernel" in md and "Sigma scaling" in md
    assert (out / "fidelity_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["variants"]["kernel"]["metrics"] == j["variants"]["kernel"]["metrics"]
    # a rerun reuses the finished runs and their evaluations: nothing is retrained or re-evaluated
    stamp = (tmp_path / "work" / "runs" / "kernel" / "eval.json").stat().st_mtime_ns
    rep2 = ablation(tmp_path / "results", tmp_path / "work", steps=2, scenes=2, batch=1, preset_name="tiny",
                    eval_scenes=1, yaw_offsets=(0.0, 0.3), pitch_offsets=(0.0,), sigma_scales=(1, 10),
                    geometry_resolution=16, n_points=300, progress=False, name="fidelity_test",
                    metrics=("psnr", "depth", "nfs", "depth_accuracy", "geometry", "sigma_scaling"))
    assert (tmp_path / "work" / "runs" / "kernel" / "eval.json").stat().st_mtime_ns == stamp
    assert rep2["variants"]["no_kernel"]["metrics"] == rep["variants"]["no_kernel"]["metrics"]


def test_bad_input(tiny_run):
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(GroundTruth(cfg), metrics=("psnr", "bogus"), **SMALL)
    with pytest.raises(TypeError, match="checkpoint path"):
        evaluate(42, **SMALL)
    with pytest.raises(ValueError, match="sigma_scales"):
        evaluate(GroundTruth(cfg), sigma_scales=(1, -2), **SMALL)
    with pytest.raises(ValueError, match="n_scenes"):
        evaluate(GroundTruth(cfg), **{**SMALL, "n_scenes": 0})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate(tiny_run / "nope.pt", **SMALL)
    with pytest.raises(ValueError, match="unknown ablation variants"):
        ablation("/nonexistent", "/nonexistent", variants=("kernel", "warp"))
    with pytest.raises(ValueError, match="steps"):
        ablation("/tmp", "/tmp", steps=0)


def test_eval_cli_writes_eval_json(tmp_path, capsys):
    import json
    import warnings

    from g3dr.cli import main
    from g3dr.config import apply_overrides, preset
    from g3dr.train import train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(apply_overrides(preset("tiny"), ["train.steps=1"]), tmp_path / "run", progress=False)
    main(["eval", "--ckpt", str(tmp_path / "run"), "--metrics", "psnr,depth,nfs,sigma_scaling", "--scenes", "1",
          "--sigma-scales", "1,5", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"psnr", "depth_abs_mean", "nfs_canonical"} <= set(res["metrics"]) and set(res["sigma_scaling"]) >= {"1", "5"}
    assert "psnr" in capsys.readouterr().out
    import pytest
    with pytest.raises(SystemExit):
        main(["eval", "--data", "synthetic"])  # no --ckpt
