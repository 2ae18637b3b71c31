"""`make gpu-check` (benchmarks/gpu_check.py): the parts that run without a GPU. The GPU stages
themselves run only on a machine with one (see docs/backends.md)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import gpu_check  # noqa: E402


def test_arguments():
    a = gpu_check.parse_args(["--out", "x", "--budget-s", "60", "--skip-build"])
    assert a.out == "x" and a.budget_s == 60 and a.skip_build and not a.skip_tests
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args([])  # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--budget-s", "0"])


def test_build_is_offline_for_this_gpu_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cmd, env = gpu_check.build_command((9, 0))
    assert cmd[1:] == ["setup.py", "build_ext", "--inplace"] and not any("pip" in c for c in cmd)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["G3DR_CUDA"] == "1"
    assert gpu_check.arch_list((8, 6)) == "8.6"
    cmd, env = gpu_check.gpu_tests_command(Path("/tmp/o"))
    assert "TRITON_INTERPRET" not in env and cmd[cmd.index("-k") + 1] == "triton or cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_no_gpu_exits_clearly(tmp_path, capsys):
    t = time.time()
    assert gpu_check.main(["--out", str(tmp_path / "o")]) == gpu_check.NO_GPU_EXIT
    assert time.time() - t < 10
    assert "no CUDA GPU" in capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert res["status"] == "no-gpu" and res["device"] is None and res["torch"] == torch.__version__
    assert "no GPU" in (tmp_path / "o" / "gpu_check.md").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_target_needs_out():
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "usage: make gpu-check OUT=DIR" in r.stdout


def test_stage_timeout_kills_a_silent_process(tmp_path):
    t = time.time()
    r = gpu_check.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                             tmp_path / "log", timeout=1.0)
    assert r["timed_out"] and time.time() - t < 20 and "killed" in (tmp_path / "log").read_text()
    r = gpu_check.run_logged([sys.executable, "-c", "print('hi')"], dict(os.environ), tmp_path / "log2", 30.0)
    assert r == dict(rc=0, timed_out=False, seconds=r["seconds"]) and "hi" in (tmp_path / "log2").read_text()


def test_benchmark_plumbing_on_cpu(tmp_path):
    """The benchmark cases and the summary, on tiny CPU inputs (the GPU run uses the G3DR size)."""
    size = dict(C=4, H=8, R=16, S=8, hidden=8, D=3)
    rows = gpu_check.run_benchmarks(time.time() + 60, 1, dev="cpu", size=size, batches=(1, 2))
    ok = {(r["op"], r["impl"], r["config"].split()[1]) for r in rows if r["status"] == "ok"}
    assert ("render", "baseline", "B=1") in ok and ("composite", "baseline", "B=1") in ok
    assert ("render", "baseline", "B=2") in ok and ("sample", "baseline", "B=2") not in ok
    from g3dr_kernels import _backend
    if _backend._unavailable("render", "cpu", torch.device("cpu")) is None:
        assert ("render", "cpu", "B=1") in ok and ("composite", "cpu", "B=1") in ok
    late = gpu_check.run_benchmarks(time.time() - 1, 1, dev="cpu", size=size, batches=(1,))
    assert late and all(r["status"] == "skipped: time budget" for r in late)
    gpu_check.write_summary(tmp_path, dict(date="d", commit="c", torch="t", status="passed", device="cpu",
                                           bench=rows))
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| render B=1 C=4 8x8 L3 R=16 S=4+4 fwd+bwd | baseline |" in md


def test_backends_report_from_a_fresh_interpreter():
    rep = gpu_check.backends_report()
    assert rep["torch"]["available"] is True and "cuda" in rep
