"""Checkpoints and model files.

Checkpoint (`RUN/checkpoints/step_XXXXXXXX.pt`, `last.pt`): a torch file that `torch.load(...,
weights_only=True)` reads (tensors, numbers, strings, lists, dicts; the RNG states converted to
those): the model, the optimizer, the step, the config as a dict, the RNG states, plus
`format: "g3dr-checkpoint"` and `sha256`, a digest of everything else that is verified on every load
(a truncated or bit-flipped file is an error, never silently used). `last.pt` is a file of its own,
not a second name of the newest step file, so damage to one leaves the other. Writes are atomic:
killing the process at any moment leaves the previous files intact.

Model file (`*.safetensors`, what `models/` ships): the G3DR state dict as safetensors with metadata
{"format": "g3dr-model", "config": JSON of Config.to_dict(), "sha256": digest of the tensors, and
free-form string fields such as "step"}. `save_model(model_or_state_dict, cfg, path, **meta)`.

`load(path)` takes a run folder (its newest valid checkpoint), a checkpoint file or a model file and
returns {"model": state_dict, "config": dict, "step": int, ...}. Nothing is ever unpickled: files
in the old pickled format are refused with the conversion command (`g3dr convert OLD NEW --trust`).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .files import UnsafeFileError, atomic_write, load_tensors, save_tensors, state_digest, torch_load

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
CHECKPOINT_FORMAT = "g3dr-checkpoint"
MODEL_FORMAT = "g3dr-model"
PLANES_FORMAT = "g3dr-planes"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, wrong kind, no usable checkpoint in a run)."""


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over `path`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> Dict[str, Any]:
    """Every RNG state as tensors, ints and lists (readable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    s = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
         "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
                   "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if isinstance(s["python"], tuple):  # written by g3dr before the weights_only format
        random.setstate(s["python"])
    else:
        random.setstate((3, tuple(int(v) for v in s["python"]), s.get("python_gauss")))
    n = s["numpy"]
    if isinstance(n, dict):
        np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                                   "pos": n["pos"]},
                             "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    else:
        np.random.set_state(n)
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> Path:
    """state (tensors, numbers, strings, lists, dicts) + format + sha256 -> a checkpoint file (atomic)."""
    body = {k: v for k, v in state.items() if k not in ("format", "sha256")}
    body["format"] = CHECKPOINT_FORMAT
    atomic_save({**body, "sha256": state_digest(body)}, path)
    return Path(path)


def read_checkpoint(path: Union[str, Path], map_location="cpu") -> Dict[str, Any]:
    """A checkpoint file, verified: CheckpointError when damaged or not a g3dr checkpoint,
    UnsafeFileError (never unpickled) for the old pickled format."""
    path = Path(path)
    try:
        ck = torch_load(path, map_location)
    except UnsafeFileError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e).replace(f"cannot read {path}", f"cannot read checkpoint {path}", 1)) from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise CheckpointError(f"{path} is not a g3dr checkpoint (expected keys 'model', 'config', 'step'); for an "
                              f"official G3DR checkpoint use g3dr.model.load_official_checkpoint")
    if "sha256" not in ck:
        raise CheckpointError(f"{path} has no checksum (written by an older g3dr?); convert it with "
                              f"`g3dr convert {path} NEW.pt --trust` if you trust it")
    want = ck.pop("sha256")
    if state_digest(ck) != want:
        raise CheckpointError(f"{path} is damaged: its checksum does not match its contents")
    return ck


class Checkpointer:
    """Writes `run/checkpoints/step_XXXXXXXX.pt` and `last.pt` (two separate files); keeps the newest
    `keep_last` step files (older step files written by this run folder are removed; `last.pt` is
    never removed)."""

    def __init__(self, run_dir: Union[str, Path], keep_last: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def save(self, state: Dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        step_file = self.dir / f"step_{state['step']:08d}.pt"
        save_checkpoint(state, step_file)
        # last.pt: a copy (not a hard link), written after the step file, so a kill in between leaves
        # a newer step file that find_resume prefers
        atomic_write(self.last, lambda tmp: shutil.copyfile(step_file, tmp))
        self._prune()
        return step_file

    def step_files(self) -> List[Tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name)))

    def _prune(self) -> None:
        steps = self.step_files()
        for _, p in steps[:max(0, len(steps) - self.keep_last)]:
            p.unlink()

    def find_resume(self, map_location="cpu") -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The newest valid checkpoint of the run, loaded and verified: last.pt, or a newer step file,
        or (when last.pt is damaged) the newest valid step file, with a warning naming what was
        skipped. None when the run never wrote a checkpoint; CheckpointError when it wrote some and
        none is usable."""
        problems, best = [], None

        def attempt(p: Path):
            try:
                return read_checkpoint(p, map_location)
            except (ValueError, OSError) as e:
                problems.append(f"{p.name}: {e}")
                return None
        if self.last.is_file() and (ck := attempt(self.last)) is not None:
            best = (self.last, ck)
        for step, p in reversed(self.step_files()):  # newest first; only newer than last.pt
            if best is not None and step <= best[1]["step"]:
                break
            if (ck := attempt(p)) is not None:
                best = (p, ck)
                break
        if best is None and problems:
            raise CheckpointError(f"no usable checkpoint in {self.dir}: " + "; ".join(problems)
                                  + " (--overwrite starts the run over)")
        if best is not None and problems:
            warnings.warn(f"skipped damaged checkpoint(s) ({'; '.join(problems)}); resuming from {best[0]}")
        return best


# ---------------------------------------------------------------------------------------------
# Model files (safetensors)
# ---------------------------------------------------------------------------------------------


def save_model(model_or_state_dict, cfg, path: Union[str, Path], **meta) -> Path:
    """A trained G3DR (module or state dict) + its Config (or Config.to_dict()) -> a .safetensors model
    file with metadata {"format": "g3dr-model", "config": JSON, "sha256": ..., **meta as strings}."""
    state = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    state = {k: v.detach().cpu() for k, v in state.items()}
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    reserved = {"format", "config", "sha256"} & set(meta)
    if reserved:
        raise ValueError(f"save_model: {sorted(reserved)} are set by save_model itself")
    metadata = {"format": MODEL_FORMAT, "config": json.dumps(cfg_dict, sort_keys=True), "sha256": state_digest(state),
                **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    return save_tensors(path, state, metadata)


def load_model_file(path: Union[str, Path], map_location="cpu") -> Dict[str, Any]:
    """A .safetensors model file -> {"model", "config", "step", "meta"}, its checksum verified."""
    path = Path(path)
    tensors, meta = load_tensors(path, map_location)
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a g3dr model file (metadata format={meta.get('format')!r}, expected "
                              f"{MODEL_FORMAT!r})")
    try:
        cfg = json.loads(meta["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: the model file's config metadata is missing or not JSON ({e})") from None
    if "sha256" in meta and state_digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"{path} is damaged: its checksum does not match its contents")
    step = meta.get("step")
    return {"model": tensors, "config": cfg, "step": int(step) if step and step.isdigit() else None, "meta": meta,
            "format": MODEL_FORMAT}


def load(path: Union[str, Path], map_location="cpu") -> Dict[str, Any]:
    """A run folder (its newest valid checkpoint), a checkpoint file (.pt) or a model file
    (.safetensors) -> {"model": state_dict, "config": dict, "step": ..., ...}, verified."""
    path = Path(path)
    if path.is_dir():
        found = Checkpointer(path).find_resume(map_location)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path / 'checkpoints'} (a run folder, checkpoint file or "
                                    f".safetensors model file is expected)")
        return found[1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_model_file(path, map_location)
    return read_checkpoint(path, map_location)


def convert(old: Union[str, Path], new: Union[str, Path], trust: bool = False) -> Dict[str, str]:
    """Rewrite a file in the old pickled format (a g3dr checkpoint, a `planes.pt`, or an official G3DR
    checkpoint) in a format that loads without unpickling: `.pt` -> checkpoint (or a state dict of
    tensors for an official checkpoint), `.safetensors` -> model or planes file. UNPICKLES `old`, which
    runs any code it holds: only with trust=True, for files whose source you trust."""
    old, new = Path(old), Path(new)
    if not trust:
        raise ValueError(f"g3dr convert unpickles {old}, which runs any code the file contains; pass --trust only if "
                         f"you trust its source")
    if not old.is_file():
        raise FileNotFoundError(f"file not found: {old}")
    if new.resolve() == old.resolve():
        raise ValueError("convert: write to a new file, not over the old one")
    if new.suffix not in (".pt", ".safetensors"):
        raise ValueError(f"convert: the new file must end in .pt (checkpoint) or .safetensors (model or planes), "
                         f"got {new.name}")
    blob = torch.load(old, map_location="cpu", weights_only=False)  # the trusted, explicit unpickling
    if isinstance(blob, dict) and "planes" in blob and isinstance(blob["planes"], torch.Tensor):
        if new.suffix != ".safetensors":
            raise ValueError("convert: planes files become .safetensors")
        save_tensors(new, {"planes": blob["planes"]}, {"format": PLANES_FORMAT,
                                                       "config": json.dumps(blob.get("config", {}), sort_keys=True),
                                                       "image": str(blob.get("image", ""))})
        return {"kind": "planes", "out": str(new)}
    if not isinstance(blob, dict) or not isinstance(blob.get("model", blob), dict):
        raise ValueError(f"convert: {old} is neither a g3dr checkpoint, a planes file nor an official G3DR checkpoint")
    if "config" in blob:
        if new.suffix == ".safetensors":
            save_model(blob["model"], blob["config"], new, step=str(blob.get("step", "")), source=old.name)
            return {"kind": "model", "out": str(new)}
        state = {k: v for k, v in blob.items() if k != "sha256"}
        if "rng" in state:
            state["rng"] = _safe_rng(state["rng"])
        save_checkpoint(state, new)
        return {"kind": "checkpoint", "out": str(new)}
    state = blob.get("model", blob)  # official: {'model': state_dict, ...} or a bare state dict
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if new.suffix == ".safetensors":
        raise ValueError("convert: an official checkpoint becomes a .pt state dict (it has no g3dr config)")
    atomic_save({"model": tensors}, new)
    return {"kind": "official", "out": str(new)}


def _safe_rng(s: Dict[str, Any]) -> Dict[str, Any]:
    """An old checkpoint's RNG states (numpy's as a tuple with an array) -> rng_state()'s layout."""
    out = dict(s)
    if isinstance(s.get("python"), tuple):
        out["python"], out["python_gauss"] = list(s["python"][1]), s["python"][2]
    n = s.get("numpy")
    if isinstance(n, tuple):
        out["numpy"] = {"key": torch.from_numpy(np.asarray(n[1]).astype(np.int64)), "pos": int(n[2]),
                        "has_gauss": int(n[3]), "gauss": float(n[4])}
    return out


__all__ = ["CheckpointError", "Checkpointer", "UnsafeFileError", "atomic_save", "convert", "load", "load_model_file",
           "read_checkpoint", "rng_state", "save_checkpoint", "save_model", "set_rng_state"]
