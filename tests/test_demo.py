"""The main job end to end (`g3dr demo --quick`: tiny preset, a few steps)."""
import json

import pytest
from PIL import Image

from g3dr.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu", "--frames", "4"])
    out = capsys.readouterr().out
    strip = Image.open(tmp_path / "turntable.png")
    assert strip.size == (4 * 16, 2 * 16)  # colour row over depth row, one column per view
    assert Image.open(tmp_path / "turntable" / "video.gif").n_frames >= 2
    assert (tmp_path / "turntable" / "video.mp4").stat().st_size > 0
    assert (tmp_path / "depth_mesh.glb").stat().st_size > 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert "psnr_covis" in out and "depth_med_obj" in out and "speed-up" in out and "torch" in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["setup"]["scenes"] == 2 and "fog_obj" in scores["mean"]
    assert Image.open(tmp_path / "heldout.png").size[1] > 0
    # a second run resumes the finished training run instead of failing on the existing folder
    main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu", "--frames", "4", "--no-timings"])
    assert "speed-up" not in capsys.readouterr().out


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "gpu"])
