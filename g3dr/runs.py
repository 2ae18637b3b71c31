"""The run folder as a contract: one training at a time, nothing lost, strict logs.

- `RunLock(out)`: `RUN/train.lock` holds the owner's pid and host; a second training on the same
  folder is refused with both named. The lock is an flock on that file, so a lock left by a
  killed process is stale at once and taken over (where flock is not supported, a lock whose pid no
  longer runs on this host is).
- `check_out(out)`: the output location is usable (not a file, writable) before anything is built.
- `find_start(out, resume, overwrite)`: which checkpoint to start from, loaded and verified, before
  anything in the folder is changed. `--resume auto` takes the newest valid checkpoint (last.pt, or
  the newest valid step file when last.pt is damaged) and starts fresh when none was ever written;
  `--overwrite` means replace (never resume).
- `begin(out, start, overwrite)`: only once config, data, model and checkpoint are all validated:
  replaces the previous run (overwrite), drops log rows and images of steps after `start` (they are
  redone), and removes temporaries left by a killed process.
- `write_stats(f, rec)`: one strict-JSON line (non-finite numbers as null, named in "nonfinite").
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .checkpoint import Checkpointer, read_checkpoint
from .devices import check_memory
from .files import FILE_MODE, atomic_write, strict

LOCK_NAME = "train.lock"
# what a run writes into its folder; --overwrite removes these (and nothing else)
RUN_OUTPUTS = ("checkpoints", "images", "tb", "stats.jsonl", "config.yaml", "curves.png")
_IMAGE_RE = re.compile(r"^step_(\d+)\.png$")


class RunFolderError(RuntimeError):
    """The output folder holds a previous run and neither resume nor overwrite was asked for, or
    another training holds it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder (created if missing; removed again on release when the
    failed start left it empty)."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd: Optional[int] = None
        self.created = False

    def _owner(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('started')})"
        except (OSError, ValueError):
            return "another process"

    def acquire(self) -> "RunLock":
        check_out(self.out)
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        import fcntl  # POSIX only: here, so that importing g3dr does not need it
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse()
            except OSError as e:  # no flock here (some network file systems)
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                return self._acquire_by_pid()
            try:  # the file we locked may have been removed and replaced by its last owner meanwhile
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._write_owner()
                return self
            os.close(fd)
        raise RunFolderError(f"could not lock {self.path}")

    def _refuse(self):
        raise RunFolderError(f"{self.out} is in use by another training ({self._owner()}); wait for it to finish or "
                             f"stop it, or train into another --out")

    def _acquire_by_pid(self) -> "RunLock":
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        stale = info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid") or 0))
        if info.get("pid") and not stale:
            self._refuse()
        self._write_owner()
        return self

    def _write_owner(self) -> None:
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data.encode(), 0)
        else:
            self.path.write_text(data)

    def release(self) -> None:
        if self.fd is not None or self.path.is_file():
            try:
                os.unlink(self.path)  # while still holding the lock (see the inode check in acquire)
            except FileNotFoundError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.created:
            try:
                self.out.rmdir()  # only when empty: a start that failed leaves no folder behind
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def check_out(out) -> None:
    """The run folder can be used: not a file, and it or its nearest existing parent is writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; choose a folder for the run")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {probe} is not writable; choose a writable folder")


def check_size(cfg, device) -> None:
    """ValueError before building anything when the model's resolution could not fit in memory (a lower
    bound: the positional embedding, one batch of planes and their gradient, the sample depths, float32)."""
    m, r, b = cfg.model, cfg.render, cfg.train.batch_size
    px = m.image_size ** 2
    samples = r.n_coarse + max(r.n_fine, r.n_target) + (r.n_target if r.target_mode == "add" else 0)
    nbytes = 4 * (m.pos_channels * px + 2 * b * 3 * m.plane_channels * px
                  + b * px * samples * 3)
    check_memory(nbytes, f"model.image_size={m.image_size} at batch {b}", "use a smaller model.image_size, "
                 "train.batch_size or fewer samples", device)


def _occupied(out: Path) -> bool:
    return out.is_dir() and any((out / n).exists() for n in ("checkpoints", "stats.jsonl"))


def find_start(out, resume: str, overwrite: bool, map_location="cpu") -> Tuple[Optional[Path], Optional[Dict]]:
    """(checkpoint path, loaded checkpoint) to start from, or (None, None) for a fresh start. Reads only;
    RunFolderError when the folder holds a run and neither resume nor overwrite was asked for."""
    out = Path(out)
    explicit = resume not in ("auto", "never")
    if overwrite and explicit:
        raise ValueError("--overwrite replaces the run in --out and never resumes; it cannot go with --resume FILE")
    if explicit:
        p = Path(resume)
        if not p.exists():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        if p.is_dir():
            found = Checkpointer(p).find_resume(map_location)
            if found is None:
                raise FileNotFoundError(f"--resume {resume}: no checkpoint in {p / 'checkpoints'}")
            return found
        return p, read_checkpoint(p, map_location)
    if overwrite:
        return None, None
    if resume == "auto":
        found = Checkpointer(out).find_resume(map_location)
        if found is not None:
            return found
        return None, None  # no checkpoint was ever written: a fresh start (its stale logs are dropped)
    if _occupied(out):
        raise RunFolderError(f"{out} already holds a run; use --resume auto to continue it or --overwrite to replace it")
    return None, None


def check_resumable(ck: Dict[str, Any], cfg, source) -> None:
    """ValueError naming the differing model fields when a checkpoint cannot load into cfg's model."""
    old, new = ck.get("config", {}).get("model", {}), cfg.to_dict()["model"]
    diff = [f"model.{k}={old.get(k)!r} (checkpoint) vs {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"cannot resume from {source}: it was trained with another model config ({'; '.join(diff[:4])}"
                         f"{'; ...' if len(diff) > 4 else ''}); resume with its config (--config RUN/config.yaml) or "
                         f"start a new run (--overwrite or another --out)")


def begin(out, start: int, overwrite: bool) -> None:
    """Make the folder ready for a run starting at `start` (after every check passed): with overwrite
    the previous run's outputs are removed; log rows and images of steps after `start` are dropped
    (they are redone, so steps in stats.jsonl strictly increase); temporaries of killed processes go."""
    out = Path(out)
    if overwrite:
        for name in RUN_OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for folder in (out, out / "checkpoints", out / "images"):
        if folder.is_dir():
            for p in folder.iterdir():
                if ".tmp" in p.name and p.is_file():
                    p.unlink()  # a temp file of a killed writer (we hold the lock: nobody else writes here)
    trim_stats(out / "stats.jsonl", start)
    if (out / "images").is_dir():
        for p in (out / "images").iterdir():
            m = _IMAGE_RE.match(p.name)
            if m and int(m.group(1)) > start:
                p.unlink()


def trim_stats(path, start: int) -> None:
    """Keep the rows of stats.jsonl with step <= start (and no damaged last line), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    keep, changed = [], False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            ok = int(row["step"]) <= start and (not keep or int(row["step"]) > keep[-1][0])
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append((int(row["step"]), line))
        else:
            changed = True
    if changed:
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for _, line in keep)))


def write_stats(f, rec: Dict[str, Any]) -> None:
    """One strict-JSON line: non-finite numbers become null and are named in rec["nonfinite"]."""
    clean, bad = strict(rec)
    if bad:
        clean["nonfinite"] = bad
    f.write(json.dumps(clean, allow_nan=False) + "\n")
    f.flush()
