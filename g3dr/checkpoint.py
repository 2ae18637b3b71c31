"""Checkpoints: atomic writes (temp file, fsync, rename), `last.pt` plus the last N step files,
resume. A checkpoint holds the model, the optimizer, the step, the config (as a dict) and the RNG
states; killing the process at any moment leaves the previous `last.pt` intact."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> Dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


class Checkpointer:
    """Writes `run/checkpoints/step_XXXXXXXX.pt` and `last.pt`; keeps the newest `keep_last` step files
    (older step files written by this run folder are removed; `last.pt` is never removed)."""

    def __init__(self, run_dir: Union[str, Path], keep_last: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def save(self, state: Dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        step_file = self.dir / f"step_{state['step']:08d}.pt"
        atomic_save(state, step_file)
        tmp = self.dir / f".last.pt.link{os.getpid()}"  # last.pt: a second name for the same file, swapped in atomically
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(step_file, tmp)
            os.replace(tmp, self.last)
        except OSError:  # file systems without hard links
            atomic_save(state, self.last)
        self._prune()
        return step_file

    def _prune(self) -> None:
        steps = sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name)))
        for _, p in steps[:max(0, len(steps) - self.keep_last)]:
            p.unlink()

    def find_resume(self) -> Optional[Path]:
        return self.last if self.last.is_file() else None


def load(path: Union[str, Path], map_location="cpu") -> Dict[str, Any]:
    """Load a g3dr checkpoint (a file, or a run folder -> its checkpoints/last.pt) with a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a torch file?): {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a g3dr checkpoint (expected keys 'model', 'config', 'step'); for an official "
                         f"G3DR checkpoint use g3dr.model.load_official_checkpoint")
    return ckpt
