"""The main job end to end, on tiny settings."""
import pytest
from PIL import Image

from g3dr.cli import main


def test_demo_writes_pictures_and_table(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--res", "16", "--views", "3", "--n-coarse", "8", "--n-fine", "8",
          "--device", "cpu"])
    strip = Image.open(tmp_path / "turntable.png")
    assert strip.size == (3 * 16, 2 * 16)  # colour row over depth row
    gif = Image.open(tmp_path / "turntable.gif")
    assert gif.n_frames == 3
    out = capsys.readouterr().out
    assert "backend" in out and "torch" in out and "speed-up" in out
    # the planet is in the middle of the first view: not all white
    px = strip.convert("RGB").getpixel((8, 8))
    assert px != (255, 255, 255)


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--res", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "gpu"])
