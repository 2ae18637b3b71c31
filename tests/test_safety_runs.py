"""Fault and abuse tests, runs and outputs: SIGKILL at random moments, concurrent trainings,
--overwrite, data checked up front, strict stats.jsonl, a full disk, one-line errors, render outputs
that cannot collide or go stale."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from g3dr import checkpoint
from g3dr.cli import main
from g3dr.config import apply_overrides, preset
from g3dr.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.save_every=1", "train.log_every=1", "train.image_every=100", "data.synthetic_scenes=2"]


@pytest.fixture(autouse=True)
def _quiet_random_init_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM.*")
        yield


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def _cli(args):
    return subprocess.Popen([sys.executable, "-m", "g3dr", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _strict_rows(run):
    """stats.jsonl parsed as strict JSON (a NaN/Infinity token is an error)."""
    def refuse(tok):
        raise ValueError(f"non-strict JSON token {tok}")
    lines = (Path(run) / "stats.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def _exit2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [x for x in err.splitlines() if x.strip() and "it/s]" not in x]  # tqdm progress bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety_runs") / "run"
    train(apply_overrides(preset("tiny"), ["train.steps=2", *TINY]), d, resume="never", progress=False)
    return d


@pytest.fixture
def picture(tmp_path):
    return _picture(tmp_path, "pic.png", 0)


def _picture(folder, name, seed):
    from PIL import Image

    from g3dr.depthio import write_depth_png
    from g3dr.synthetic import canonical_rgbd
    folder.mkdir(parents=True, exist_ok=True)
    img, dep = canonical_rgbd(seed, resolution=16)
    p = folder / name
    Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(p)
    write_depth_png(folder / f"{p.stem}_depth.png", dep[0])
    return p


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments
# ---------------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_resumes_bit_exact(tmp_path):
    """20 processes in a row on one run folder, each SIGKILLed at a random moment (while importing,
    before the first checkpoint, mid-step, mid-save), then one that finishes. Every start resumes from
    the newest valid checkpoint or starts fresh when none was written; the end result, and the loss
    logged at every step, equal an uninterrupted run bit for bit, and no lock or temp file is left."""
    args = ["--config", "tiny", "--quiet", "train.steps=30", "schedule.p_novel_max=0.5", "schedule.p_novel_ramp=0",
            "train.keep_last=2", "train.image_every=7", *[a for a in TINY if "image_every" not in a]]
    ref = _cli(["train", "--out", str(tmp_path / "ref"), *args])
    run = tmp_path / "run"
    stats = run / "stats.jsonl"
    rng = random.Random(18)
    kills = 0
    for trial in range(20):
        rows_before = len(stats.read_text().splitlines()) if stats.is_file() else 0
        p = _cli(["train", "--out", str(run), *args])
        if trial == 0:  # holding the lock, before any checkpoint: the next start must start fresh
            t0 = time.time()
            while not any((run / n).exists() for n in ("train.lock", "stats.jsonl")) and p.poll() is None \
                    and time.time() - t0 < 60:
                time.sleep(0.005)
        elif rng.random() < 0.3:  # somewhere in the start-up: imports, building, the first checkpoint
            time.sleep(rng.uniform(0.0, 3.0))
        else:  # after 0-2 more logged steps, at a random moment within the next step or save
            target, t0 = rows_before + rng.randint(0, 2), time.time()
            while p.poll() is None and time.time() - t0 < 120:
                if stats.is_file() and len(stats.read_text().splitlines()) > target:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.2))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=120)
        if p.returncode == 0:
            break  # finished before the kill
        assert p.returncode == -signal.SIGKILL, out
        kills += 1
        found = checkpoint.Checkpointer(run).find_resume()  # what is on disk is usable (or nothing is)
        assert trial > 0 or found is None
        if stats.is_file():
            steps = [r["step"] for r in _strict_rows(run)]
            assert steps == sorted(set(steps)), steps
    final = _cli(["train", "--out", str(run), *args])
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out
    out_ref, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out_ref
    assert kills >= 15, kills
    a, b = checkpoint.load(run), checkpoint.load(tmp_path / "ref")
    assert a["step"] == b["step"] == 30
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows, rows_ref = _strict_rows(run), _strict_rows(tmp_path / "ref")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert [r["total"] for r in rows] == [r["total"] for r in rows_ref]
    assert sorted(p.name for p in (run / "images").iterdir()) == sorted(p.name for p in (tmp_path / "ref" / "images").iterdir())
    left = [p.name for p in run.rglob("*") if ".tmp" in p.name or p.name == "train.lock"]
    assert not left, left


# ---------------------------------------------------------------------------------------------
# One training per folder
# ---------------------------------------------------------------------------------------------


def test_a_second_training_on_a_running_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    a = _cli(["train", "--config", "tiny", "--out", str(run), "--quiet", "train.steps=400", "train.save_every=1000",
              "train.log_every=1", "train.image_every=1000"])
    stats, t0 = run / "stats.jsonl", time.time()
    while (not stats.is_file() or stats.stat().st_size == 0) and a.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    try:
        line = _exit2(["train", "--config", "tiny", "--out", str(run), "--quiet", "train.steps=400"], capsys)
        assert "in use" in line and f"pid {a.pid}" in line
        line = _exit2(["train", "--config", "tiny", "--out", str(run), "--quiet", "--overwrite"], capsys)
        assert "in use" in line
    finally:
        a.send_signal(signal.SIGTERM)
        out, _ = a.communicate(timeout=300)
    assert a.returncode == 130, out
    steps = [r["step"] for r in _strict_rows(run)]
    assert steps == list(range(1, len(steps) + 1))
    assert not (run / "train.lock").exists()
    done = checkpoint.load(run)["step"]
    train(apply_overrides(preset("tiny"), [f"train.steps={done + 1}", *TINY]), run, progress=False)  # free again
    assert checkpoint.load(run)["step"] == done + 1


def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch):
    """A lock file left by a dead process: free at once with flock, and by its dead pid where the file
    system has no flock."""
    import fcntl
    import socket

    from g3dr.runs import RunFolderError, RunLock
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(run):
        assert json.loads((run / "train.lock").read_text())["pid"] == os.getpid()

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "no locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    (run / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(run):
        pass
    (run / "train.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(RunFolderError, match="in use"):
        RunLock(run).acquire()


# ---------------------------------------------------------------------------------------------
# --overwrite, data checks, strict logs
# ---------------------------------------------------------------------------------------------


def test_overwrite_validates_before_deleting_and_then_replaces(run, tmp_path, capsys):
    import shutil
    victim = tmp_path / "run"
    shutil.copytree(run, victim)
    before = _tree(victim)
    base = ["train", "--config", "tiny", "--out", str(victim), "--quiet", *TINY]
    line = _exit2([*base, "--overwrite", "--resume", "never", "--data", str(tmp_path / "typo")], capsys)
    assert "typo" in line
    line = _exit2([*base, "--overwrite", "train.log_every=0"], capsys)
    assert "train.log_every" in line
    assert _tree(victim) == before  # nothing deleted by a start that failed
    main([*base, "--overwrite", "train.steps=1"])  # replaces: no resume of the 2-step run
    assert [r["step"] for r in _strict_rows(victim)] == [1]
    assert checkpoint.load(victim)["step"] == 1 and not (victim / "checkpoints" / "step_00000002.pt").exists()


def test_bad_data_files_are_all_found_before_step_0(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(3):
        _picture(data, f"ok{i}.png", i)
    _picture(data, "broken.png", 0).write_text("not an image")  # its depth file is fine
    _picture(data, "nodepth.png", 1)
    (data / "nodepth_depth.png").unlink()
    out = tmp_path / "run"
    line = _exit2(["train", "--config", "tiny", "--out", str(out), "--quiet", "--data", str(data), "train.steps=1"],
                  capsys)
    assert "2 bad file(s)" in line and "broken.png" in line and "nodepth" in line and "skip_bad" in line
    assert not out.exists()  # a failed start leaves no folder behind
    main(["train", "--config", "tiny", "--out", str(out), "--quiet", "--data", str(data), "train.steps=1",
          "data.skip_bad=true"])
    assert [r["step"] for r in _strict_rows(out)] == [1]


def test_stats_are_strict_json_with_strictly_increasing_steps(tmp_path, monkeypatch):
    import g3dr.losses as L
    real = L.Criterion.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            terms["total"] = terms["total"] * float("nan")
        return terms
    monkeypatch.setattr(L.Criterion, "forward", poisoned)
    cfg = apply_overrides(preset("tiny"), ["train.steps=4", *TINY])
    train(cfg, tmp_path / "run", progress=False, max_steps=2)
    stats = tmp_path / "run" / "stats.jsonl"
    with open(stats, "a") as f:  # a row of a step that was never saved (a kill after logging it)
        f.write(json.dumps({"step": 3, "total": 1.0}) + "\n")
    train(cfg, tmp_path / "run", progress=False)
    rows = _strict_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["total"] is None and "total" in rows[1]["nonfinite"] and rows[1]["skipped_steps"] == 1
    assert "nonfinite" not in rows[2] and rows[2]["total"] != 1.0


# ---------------------------------------------------------------------------------------------
# One-line errors (exit code 2, no traceback)
# ---------------------------------------------------------------------------------------------

TRAIN_CASES = {
    "device_foo": (["train.device=foo"], "train.device"),
    "log_every_0": (["train.log_every=0"], "train.log_every"),
    "image_every_0": (["train.image_every=0"], "train.image_every"),
    "steps_0": (["train.steps=0"], "train.steps"),
    "w_recon_nan": (["loss.w_recon=nan"], "loss.w_recon"),
    "grad_clip_negative": (["train.grad_clip=-1"], "train.grad_clip"),
    "max_steps_negative": (["--max-steps", "-1"], "--max-steps"),
    "yaml_syntax": (["--config", "{bad.yaml}"], "not valid YAML"),
    "out_is_a_file": (["--out", "{file}"], "is a file"),
    "other_preset": (["--config", "small", "--out", "{run}"], "another model config"),
    "cuda_missing": (["train.device=cuda"], "CUDA is not available"),
    "huge_image_size": (["model.image_size=262144", "model.pos_channels=4"], "smaller model.image_size"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_user_errors_are_one_line(case, run, tmp_path, capsys):
    import shutil
    extra, expect = TRAIN_CASES[case]
    if case == "cuda_missing" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "bad.yaml").write_text("train: {steps: 3\nmodel: [")
    (tmp_path / "file").write_text("x")
    shutil.copytree(run, tmp_path / "run")
    fill = {"{bad.yaml}": str(tmp_path / "bad.yaml"), "{file}": str(tmp_path / "file"), "{run}": str(tmp_path / "run")}
    extra = [fill.get(x, x) for x in extra]
    argv = ["train", "--config", "tiny", "--out", str(tmp_path / "new"), "--quiet", *extra]
    line = _exit2(argv, capsys)
    assert expect in line, line
    assert not (tmp_path / "new").exists()


INFER_CASES = {
    "render_device_foo": (["render", "--device", "foo"], "'foo' is not a device"),
    "export_device_foo": (["export", "--device", "foo"], "'foo' is not a device"),
    "render_backend_cuda": (["render", "--backend", "cuda"], "--backend cuda"),
    "render_huge_resolution": (["render", "--resolution", "10000000"], "smaller --resolution"),
    "export_huge_voxels": (["export", "--voxels", "{tmp}/v.npy", "--voxel-res", "100000"], "--voxel-res"),
    "export_out_folder_missing": (["export", "--out", "{tmp}/missing/m.glb"], "does not exist"),
    "demo_device_foo": (["demo", "--device", "foo"], "'foo' is not a device"),
}


@pytest.mark.parametrize("case", list(INFER_CASES))
def test_render_export_demo_user_errors_are_one_line(case, run, picture, tmp_path, capsys, monkeypatch):
    extra, expect = INFER_CASES[case]
    if case == "render_backend_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    cmd, rest = extra[0], extra[1:]
    if cmd == "demo":
        argv = ["demo", "--out", str(tmp_path / "demo"), "--quick", *rest]
    else:
        out = ["--out", str(tmp_path / "o")] if cmd == "render" else ([] if "--out" in rest else
                                                                         ["--out", str(tmp_path / "m.glb")])
        argv = [cmd, "--ckpt", str(run), "--input", str(picture), *out, *rest]
    monkeypatch.setattr("g3dr.infer.G3DR.reconstruct", lambda *a, **k: pytest.fail("work started before the check"))
    line = _exit2(argv, capsys)
    assert expect in line, line


# ---------------------------------------------------------------------------------------------
# A full disk leaves the previous outputs intact
# ---------------------------------------------------------------------------------------------


def _disk_full_after(n_bytes):
    """A replacement for a writer: writes n_bytes of garbage into its target, then fails as a full disk does."""
    def write(obj, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"\0" * n_bytes)
        else:
            with open(target, "wb") as f:
                f.write(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(target, "name", target)))
    return write


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(run, tmp_path, capsys, monkeypatch):
    import shutil
    victim = tmp_path / "run"
    shutil.copytree(run, victim)
    before = {p.name: p.read_bytes() for p in (victim / "checkpoints").iterdir()}
    monkeypatch.setattr(torch, "save", _disk_full_after(1000))
    line = _exit2(["train", "--config", "tiny", "--out", str(victim), "--quiet", "train.steps=3", *TINY], capsys)
    assert "no space left" in line
    assert {p.name: p.read_bytes() for p in (victim / "checkpoints").iterdir()} == before
    monkeypatch.undo()
    assert checkpoint.load(victim)["step"] == 2


def test_a_full_disk_while_rendering_keeps_the_previous_render(run, picture, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["render", "--ckpt", str(run), "--input", str(picture), "--out", str(out), "--frames", "2",
            "--resolution", "8", "--n-coarse", "4", "--n-fine", "4", "--device", "cpu"]
    main(argv)
    before = _tree(out)
    import g3dr.infer as I
    real = I.write_views

    def half_then_full(views, dest, *a, **k):
        real({k_: v[:1] for k_, v in views.items()}, dest, *a, **k)  # one frame lands, the next is cut short
        (dest / "rgb" / "001.png").write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / "rgb" / "001.png"))
    monkeypatch.setattr(I, "write_views", half_then_full)
    line = _exit2(argv, capsys)
    assert "no space left" in line
    assert _tree(out) == before
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".old" in p.name]


# ---------------------------------------------------------------------------------------------
# Render outputs: one folder per input, no stale files, normal modes
# ---------------------------------------------------------------------------------------------


def test_render_outputs_never_collide_or_go_stale(run, tmp_path):
    from safetensors import safe_open

    from g3dr.files import FILE_MODE
    inputs = tmp_path / "in"
    sources = [_picture(inputs / "a", "x.png", 0), _picture(inputs / "b", "x.png", 1), _picture(inputs, "y.png", 2),
               _picture(inputs, "y.jpg", 3)]
    out = tmp_path / "out"
    common = ["--resolution", "8", "--n-coarse", "4", "--n-fine", "4", "--device", "cpu"]
    main(["render", "--ckpt", str(run), "--input", str(inputs), "--out", str(out), "--frames", "3", *common])
    dests = [out / "a" / "x", out / "b" / "x", out / "y.png", out / "y.jpg"]
    for src, dest in zip(sources, dests):
        with safe_open(str(dest / "planes.safetensors"), "pt") as f:
            assert f.metadata()["image"] == str(src) and f.metadata()["format"] == "g3dr-planes"
        assert sorted(p.name for p in (dest / "rgb").iterdir()) == ["000.png", "001.png", "002.png"]
        assert all(p.stat().st_mode & 0o777 == FILE_MODE for p in dest.rglob("*") if p.is_file())
    main(["render", "--ckpt", str(run), "--input", str(inputs / "a" / "x.png"), "--out", str(out / "a"),
          "--frames", "2", *common])
    assert sorted(p.name for p in (out / "a" / "x" / "rgb").iterdir()) == ["000.png", "001.png"]  # no stale 002
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".old" in p.name]
