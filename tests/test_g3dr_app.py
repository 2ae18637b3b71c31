"""The application's plumbing: the CLI's command table, the shared file writers, one training step."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr import cli
from g3dr.config import apply_overrides, preset
from g3dr.files import write_json, write_png
from g3dr.train import StepResult, setup, train_step


def test_every_command_of_the_table_has_a_parser_and_help(capsys):
    p = cli.parser()
    for name, (help_text, _, run) in cli.COMMANDS.items():
        assert callable(run) and help_text
        with pytest.raises(SystemExit) as e:
            p.parse_args([name, "--help"])
        assert e.value.code == 0
        assert f"usage: g3dr {name}" in capsys.readouterr().out
    p.print_help()
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_importing_the_cli_does_not_import_torch():
    import subprocess
    code = "import sys, g3dr.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert out.strip() == "False"


def test_write_json_strict_by_default_and_python_json_when_asked(tmp_path):
    rec = {"psnr": math.inf, "n": 1}
    assert json.loads(write_json(tmp_path / "a.json", rec).read_text()) == {"psnr": None, "n": 1}
    assert json.loads(write_json(tmp_path / "b.json", rec, allow_nan=True).read_text())["psnr"] == math.inf
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporaries left


def test_write_png_round_trip(tmp_path):
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    write_png(tmp_path / "x.png", arr)
    write_png(tmp_path / "y.png", Image.fromarray(arr))
    for name in ("x.png", "y.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y.png"]


def test_one_train_step_moves_the_parameters_and_reports_its_numbers(tmp_path):
    cfg = apply_overrides(preset("tiny"), ["train.steps=2", "schedule.p_novel_max=0"])
    (tmp_path / "run").mkdir()  # train() makes it while taking the folder's lock
    run = setup(cfg, tmp_path / "run", "never", False, False, None, None)
    before = [p.detach().clone() for p in run.model.parameters()]
    r = train_step(run, 0, next(iter(run.loader)))
    assert isinstance(r, StepResult) and not r.novel and r.images == cfg.train.batch_size
    assert torch.isfinite(r.terms["total"]) and torch.isfinite(r.grad_norm) and run.skipped == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
