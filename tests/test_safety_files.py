"""Fault and abuse tests, files: no file a user hands us can run code, damaged checkpoints
are refused or skipped, the model-file API, `g3dr convert`.

The malicious file is a pickle whose loading creates a marker file: the marker must never appear,
whichever entry point reads the file."""
import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import g3dr
from g3dr import checkpoint
from g3dr.cli import main
from g3dr.config import Config, apply_overrides, preset
from g3dr.files import UnsafeFileError
from g3dr.train import train


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appearing means the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run: steps 1..4, every step saved, the newest 3 step files kept."""
    d = tmp_path_factory.mktemp("safety_files") / "run"
    cfg = apply_overrides(preset("tiny"), ["train.steps=4", "train.save_every=1", "train.keep_last=3",
                                           "train.image_every=100", "data.synthetic_scenes=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, d, resume="never", progress=False)
    return d


@pytest.fixture
def picture(tmp_path):
    from PIL import Image

    from g3dr.depthio import write_depth_png
    from g3dr.synthetic import canonical_rgbd
    img, dep = canonical_rgbd(0, resolution=16)
    Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "pic.png")
    write_depth_png(tmp_path / "pic_depth.png", dep[0])
    return tmp_path / "pic.png"


def _evil(path, marker, kind="checkpoint"):
    payload = _Payload(marker)
    blob = {"checkpoint": {"step": 1, "model": payload, "config": {}},
            "planes": {"planes": payload}, "official": {"model": payload}, "state_dict": payload}[kind]
    torch.save(blob, path)
    assert not Path(marker).exists()
    return path


def _flip_tensor_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest stored tensor of a torch zip file (not in its metadata)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    pos = info.header_offset + 30 + n + m + info.file_size // 2
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


def _exit2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [x for x in err.splitlines() if x.strip() and "it/s]" not in x]  # tqdm progress bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


ENTRY_POINTS = ["g3dr.load", "checkpoint.load", "render", "export", "eval", "train_resume_file",
                "train_resume_run_folder", "render_run_folder", "official", "export_planes", "inception",
                "safetensors_named_pickle"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_malicious_pickle_never_runs(entry, run, picture, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _evil(tmp_path / "evil.pt", marker)
    if entry == "g3dr.load":
        with pytest.raises(UnsafeFileError, match="g3dr convert"):
            g3dr.load(evil)
    elif entry == "checkpoint.load":
        with pytest.raises(UnsafeFileError, match="could run any code"):
            checkpoint.load(evil)
    elif entry in ("render", "export"):
        out = ["--out", str(tmp_path / ("o" if entry == "render" else "m.ply"))]
        line = _exit2([entry, "--ckpt", str(evil), "--input", str(picture), *out, "--device", "cpu"], capsys)
        assert "--trust" in line
    elif entry == "eval":
        _exit2(["eval", "--ckpt", str(evil), "--scenes", "1", "--device", "cpu"], capsys)
    elif entry == "train_resume_file":
        _exit2(["train", "--config", "tiny", "--out", str(tmp_path / "new"), "--quiet", "--resume", str(evil)], capsys)
    elif entry in ("train_resume_run_folder", "render_run_folder"):
        victim = tmp_path / "victim"
        shutil.copytree(run, victim)
        for p in (victim / "checkpoints").iterdir():  # every checkpoint of the run replaced
            _evil(p, marker)
        if entry == "train_resume_run_folder":
            line = _exit2(["train", "--config", "tiny", "--out", str(victim), "--quiet", "train.steps=6"], capsys)
            assert "no usable checkpoint" in line
        else:
            _exit2(["render", "--ckpt", str(victim), "--input", str(picture), "--out", str(tmp_path / "o"),
                    "--frames", "1", "--device", "cpu"], capsys)
    elif entry == "official":
        from g3dr.model import G3DR, load_official_checkpoint
        _evil(evil, marker, "official")
        with pytest.raises(UnsafeFileError):
            load_official_checkpoint(G3DR(preset("tiny")), evil)
    elif entry == "export_planes":
        planes = _evil(tmp_path / "planes.pt", marker, "planes")
        line = _exit2(["export", "--ckpt", str(run), "--input", str(planes), "--out", str(tmp_path / "m.ply"),
                       "--device", "cpu"], capsys)
        assert "g3dr convert" in line and "planes.safetensors" in line
    elif entry == "inception":
        pytest.importorskip("torch_fidelity")
        from g3dr.metrics import inception_extractor
        _evil(evil, marker, "state_dict")
        with pytest.raises(UnsafeFileError):
            inception_extractor(evil)
    elif entry == "safetensors_named_pickle":
        disguised = _evil(tmp_path / "model.safetensors", marker)
        line = _exit2(["render", "--ckpt", str(disguised), "--input", str(picture), "--out", str(tmp_path / "o"),
                       "--device", "cpu"], capsys)
        assert "pickled" in line
        from g3dr.infer import load_planes
        with pytest.raises(UnsafeFileError):
            load_planes(disguised)
    assert not marker.exists(), f"the pickle ran through {entry}"


def test_convert_needs_trust_and_says_what_it_risks(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _evil(tmp_path / "evil.pt", marker)
    line = _exit2(["convert", str(evil), str(tmp_path / "new.pt")], capsys)
    assert "runs any code" in line and "--trust" in line
    assert not marker.exists() and not (tmp_path / "new.pt").exists()


def test_checkpoints_load_weights_only_with_a_checksum_and_separate_last(run):
    ck_dir = run / "checkpoints"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["last.pt", "step_00000002.pt", "step_00000003.pt",
                                                        "step_00000004.pt"]
    raw = torch.load(ck_dir / "last.pt", weights_only=True)  # no pickled objects at all
    assert raw["format"] == "g3dr-checkpoint" and len(raw["sha256"]) == 64 and raw["step"] == 4
    assert (ck_dir / "last.pt").stat().st_ino != (ck_dir / "step_00000004.pt").stat().st_ino  # not a hard link
    from g3dr.files import FILE_MODE
    assert all(p.stat().st_mode & 0o777 == FILE_MODE for p in ck_dir.iterdir())  # not mkstemp's 0600


@pytest.mark.parametrize("damage", ["truncated", "bit_flip"])
def test_a_damaged_last_pt_is_refused_and_resume_falls_back(damage, run, tmp_path):
    victim = tmp_path / "run"
    shutil.copytree(run, victim)
    last = victim / "checkpoints" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        _flip_tensor_byte(last)
    with pytest.raises(ValueError, match="damaged|truncated"):
        checkpoint.load(last)
    with pytest.raises(ValueError, match="damaged|truncated"):
        g3dr.load(last)
    step4 = victim / "checkpoints" / "step_00000004.pt"
    assert checkpoint.load(step4)["step"] == 4  # damage to last.pt did not reach the step file
    with pytest.warns(UserWarning, match="skipped damaged checkpoint"):
        found, ck = checkpoint.Checkpointer(victim).find_resume()
    assert found == step4 and ck["step"] == 4
    cfg = apply_overrides(preset("tiny"), ["train.steps=5", "train.save_every=1", "train.keep_last=3",
                                           "train.image_every=100", "data.synthetic_scenes=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train(cfg, victim, progress=False)
    assert summary["step"] == 5 and checkpoint.load(victim)["step"] == 5


def test_no_usable_checkpoint_is_an_error_that_touches_nothing(run, tmp_path, capsys):
    victim = tmp_path / "run"
    shutil.copytree(run, victim)
    for p in (victim / "checkpoints").iterdir():
        p.write_bytes(p.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    line = _exit2(["train", "--config", "tiny", "--out", str(victim), "--quiet", "train.steps=6"], capsys)
    assert "no usable checkpoint" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


def test_model_file_round_trip_and_integrity(run, tmp_path):
    ck = checkpoint.load(run)
    cfg = Config.from_dict(ck["config"])
    path = checkpoint.save_model(g3dr.load(run), cfg, tmp_path / "tiny.safetensors", step=ck["step"], data="synthetic")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "g3dr-model" and meta["step"] == "4" and meta["data"] == "synthetic"
    assert Config.from_dict(json.loads(meta["config"])).to_dict() == cfg.to_dict()
    for source in (run, run / "checkpoints" / "last.pt", path):  # all three kinds load the same weights
        m = g3dr.load(source, device="cpu")
        for k, v in ck["model"].items():
            assert torch.equal(m.state_dict()[k], v), (source, k)
    assert checkpoint.load(path)["step"] == 4
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the tensor data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged"):
        g3dr.load(tmp_path / "flipped.safetensors")


def test_convert_an_old_pickled_checkpoint_and_planes_file(run, tmp_path, capsys):
    """Files written before this format (numpy RNG state, pickled planes.pt) are refused with the
    command, and that command (with --trust) turns them into files that load and resume."""
    ck = checkpoint.load(run / "checkpoints" / "last.pt")
    old = {k: v for k, v in ck.items() if k not in ("format",)}
    old["rng"] = dict(old["rng"], numpy=np.random.get_state(), python=__import__("random").getstate())
    torch.save(old, tmp_path / "old.pt")  # numpy arrays: not loadable with weights_only=True
    with pytest.raises(UnsafeFileError, match="g3dr convert"):
        checkpoint.load(tmp_path / "old.pt")
    main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.pt"), "--trust"])
    new = torch.load(tmp_path / "new.pt", weights_only=True)
    assert new["step"] == 4 and checkpoint.load(tmp_path / "new.pt")["step"] == 4
    checkpoint.set_rng_state(new["rng"])
    main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.safetensors"), "--trust"])
    assert checkpoint.load(tmp_path / "new.safetensors")["format"] == "g3dr-model"
    torch.save({"planes": torch.randn(1, 3, 8, 16, 16), "config": ck["config"], "image": "x.png"}, tmp_path / "p.pt")
    line = _exit2(["export", "--ckpt", str(run), "--input", str(tmp_path / "p.pt"), "--voxels",
                   str(tmp_path / "v.npy"), "--voxel-res", "4", "--device", "cpu"], capsys)
    assert "g3dr convert" in line
    main(["convert", str(tmp_path / "p.pt"), str(tmp_path / "p.safetensors"), "--trust"])
    main(["export", "--ckpt", str(run), "--input", str(tmp_path / "p.safetensors"), "--voxels",
          str(tmp_path / "v.npy"), "--voxel-res", "4", "--device", "cpu"])
    assert np.load(tmp_path / "v.npy").shape == (4, 4, 4)
