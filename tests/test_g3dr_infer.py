"""`g3dr render` / `g3dr export` on a tiny checkpoint, the Python API, and their bad-input errors."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.cli import main
from g3dr.config import apply_overrides, preset
from g3dr.depthio import read_depth_png, write_depth_png
from g3dr.infer import load, trajectory
from g3dr.synthetic import canonical_rgbd
from g3dr.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(apply_overrides(preset("tiny"), ["train.steps=1"]), d, progress=False)
    return d


@pytest.fixture
def picture(tmp_path):
    img, dep = canonical_rgbd(5, resolution=24)
    Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "pic.png")
    write_depth_png(tmp_path / "pic_depth.png", dep[0])
    return tmp_path / "pic.png"


def test_python_api(run):
    model = load(run, device="cpu")
    img, dep = canonical_rgbd(1, resolution=16)
    planes = model.reconstruct(img[None], dep[None])
    assert planes.shape == (1, 3, 8, 16, 16)
    yaw, pitch = trajectory("front", 3)
    v = model.render(planes, (yaw, pitch), 20, n_coarse=6, n_fine=6, chunk=100)
    assert v["rgb"].shape == (3, 3, 20, 20) and v["depth"].shape == v["opacity"].shape == (3, 1, 20, 20)
    whole = model.render(planes, (yaw, pitch), 20, n_coarse=6, n_fine=6, chunk=10 ** 6)
    torch.testing.assert_close(v["rgb"], whole["rgb"])  # chunking changes nothing
    # density x s: same colour and opacity, depth unchanged in the limit of an opaque surface; exact identity at s = 1
    s1 = model.render(planes, (yaw, pitch), 20, n_coarse=6, n_fine=6, sigma_scale=1.0)
    torch.testing.assert_close(s1["depth"], whole["depth"])
    s5 = model.render(planes, (yaw, pitch), 20, n_coarse=6, n_fine=6, sigma_scale=5.0)
    assert (s5["opacity"] >= s1["opacity"] - 1e-4).float().mean() > 0.95  # denser field -> more opaque
    with pytest.raises(ValueError, match="reconstruct"):
        model.reconstruct(img[None, :, :8], dep[None])
    with pytest.raises(ValueError, match="trajectory"):
        trajectory("spiral", 3)
    assert trajectory("0:0,0.3:-0.1", 0)[0].shape == (2,)


def test_render_cli_writes_frames_videos_depth_and_planes(run, picture, tmp_path):
    out = tmp_path / "out"
    main(["render", "--ckpt", str(run), "--input", str(picture), "--out", str(out), "--frames", "3",
          "--resolution", "20", "--n-coarse", "6", "--n-fine", "6", "--device", "cpu"])
    d = out / "pic"
    assert sorted(p.name for p in (d / "rgb").iterdir()) == ["000.png", "001.png", "002.png"]
    gif = Image.open(d / "video.gif")
    assert gif.size == (40, 20)  # colour | depth side by side
    import imageio.v3 as iio
    frames = iio.imread(d / "video.mp4")
    assert frames.shape[0] == 3 and frames.shape[1:3] == (20, 40)
    dep = read_depth_png(d / "depth16" / "001.png")
    raw = np.array(Image.open(d / "depth16" / "001.png"))
    assert raw.dtype == np.uint16 and dep.shape == (20, 20) and 4 <= dep.min() and dep.max() < 6
    from safetensors.torch import load_file
    blob = load_file(d / "planes.safetensors")
    assert blob["planes"].shape == (1, 3, 8, 16, 16)
    # export from those planes: voxels and a depth mesh, and a marching-cubes mesh at an iso inside the density range
    from g3dr.export import density_grid
    model = load(run, device="cpu")
    grid = density_grid(blob["planes"], model.decoder, 16)
    iso = float(grid.min() + 0.5 * (grid.max() - grid.min()))
    main(["export", "--ckpt", str(run), "--input", str(d / "planes.safetensors"), "--out", str(tmp_path / "m.ply"),
          "--resolution", "24", "--iso", str(iso), "--voxels", str(tmp_path / "v.npz"), "--voxel-res", "8",
          "--depth-mesh", str(tmp_path / "dm.obj"), "--device", "cpu"])
    import trimesh
    assert len(trimesh.load(tmp_path / "m.ply").vertices) > 0 and len(trimesh.load(tmp_path / "dm.obj").vertices) > 0
    assert np.load(tmp_path / "v.npz")["occupancy"].shape == (8, 8, 8)


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt", "not_an_image", "depth_size", "bad_format",
                                  "no_depth", "no_surface"])
def test_bad_input_is_a_clear_error(run, picture, tmp_path, capsys, case):
    args = {"ckpt": str(run), "input": str(picture), "out": str(tmp_path / "o")}
    cmd = "render"
    extra = ["--frames", "2", "--n-coarse", "4", "--n-fine", "4", "--device", "cpu"]
    expect = {"missing_ckpt": "not found", "corrupt_ckpt": "cannot read checkpoint", "not_an_image": "cannot read image",
              "depth_size": "must match", "bad_format": "format", "no_depth": "no depth", "no_surface": "iso"}[case]
    if case == "missing_ckpt":
        args["ckpt"] = str(tmp_path / "nope.pt")
    elif case == "corrupt_ckpt":
        (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
        args["ckpt"] = str(tmp_path / "bad.pt")
    elif case == "not_an_image":
        bad = tmp_path / "x.png"
        bad.write_text("hello")
        write_depth_png(tmp_path / "x_depth.png", torch.full((8, 8), 5.0))
        args["input"] = str(bad)
    elif case == "depth_size":
        write_depth_png(tmp_path / "pic_depth.png", torch.full((7, 9), 5.0))
    elif case == "no_depth":
        (tmp_path / "pic_depth.png").unlink()
    elif case in ("bad_format", "no_surface"):
        cmd = "export"
        args["out"] = str(tmp_path / ("m.stl" if case == "bad_format" else "m.glb"))
        extra = ["--resolution", "8", "--device", "cpu"] + (["--iso", "1e9"] if case == "no_surface" else [])
    with pytest.raises(SystemExit) as e:
        main([cmd, *(x for k, v in args.items() for x in (f"--{k}", v)), *extra])
    assert e.value.code == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "o" / "pic" / "video.mp4").exists() and not (tmp_path / "m.glb").exists()


def test_depth_frames_share_one_colour_range():
    from g3dr.infer import colour_depth_frames
    a = torch.linspace(4.0, 6.0, 64).reshape(8, 8)
    b = torch.full((8, 8), 5.0)  # a frame with no spread: per-frame ranges would paint it mid-map anyway
    b[0, 0] = 4.0
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, 7, 7] = False
    cols = colour_depth_frames(torch.stack([a, b]), valid)
    assert cols.shape == (2, 8, 8, 3) and cols.dtype == torch.uint8
    assert torch.equal(cols[0, 0, 0], cols[1, 0, 0])  # depth 4 -> the same colour in both frames
    assert not torch.equal(cols[1, 0, 0], cols[1, 0, 1])  # 4 (near) and 5 differ within a frame
    assert cols[1, 7, 7].sum() == 0  # empty pixel black
