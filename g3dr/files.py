"""One home for file output and for reading the tensor files a user hands us.

Writes are atomic: a temp file beside the target (same extension, so writers that pick the format
from the name work), fsync, rename; on any error the temp file is removed and the previous file is
untouched. Files get normal modes (0666 minus the umask), not mkstemp's 0600. A full disk or a
read-only folder becomes an OSError whose message names the file and the fix.

Tensors travel as safetensors (`save_tensors` / `load_tensors`): a header of shapes and dtypes, raw
bytes, string metadata. Nothing we read is ever unpickled: `torch_load` is `torch.load` with
`weights_only=True`, and a file that needs more is refused with `UnsafeFileError`, which names the
explicit conversion command (`g3dr convert OLD NEW --trust`) and what it risks.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

PathLike = Union[str, Path]

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


class UnsafeFileError(ValueError):
    """A file that only a full unpickler could read (it may run code): refused, never loaded."""


def convert_hint(path: PathLike, new: str) -> str:
    return (f"{path} holds pickled Python objects, and loading it could run any code it contains, so g3dr "
            f"refuses it. If you trust its source, convert it once with `g3dr convert {path} {new} --trust` "
            f"(that command unpickles it, with that risk) and use the new file")


def os_error_message(e: OSError, path: PathLike) -> str:
    """A one-line description of a failed write with the fix."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path}: no space left on the device (free some space or write elsewhere)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {path}: the folder {Path(path).parent} is not writable ({e.strerror}); choose a "
                f"writable folder")
    if e.errno == errno.ENOENT:
        return f"{path}: no such file or folder"
    return f"{path}: {e.strerror or e}"


def remove_quietly(path: PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write(path: PathLike, write: Callable[[str], None], fsync: bool = True) -> Path:
    """write(tmp_path) into a temp file beside `path`, then rename it onto `path` (normal file mode).
    On any error (a full disk included) the temp file is removed and `path` is left as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise type(e)(e.errno, os_error_message(e, path)) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise type(e)(e.errno, os_error_message(e, path)) from e
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def write_bytes(path: PathLike, data: Union[bytes, str]) -> Path:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return atomic_write(path, w)


def write_png(path: PathLike, image: Union[np.ndarray, Image.Image]) -> Path:
    """A picture (uint8 [H, W, 3] or [H, W], or a PIL image) -> a PNG file, atomically."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def strict(obj: Any) -> Tuple[Any, list]:
    """obj with every non-finite float replaced by None, and the dotted names of those values."""
    bad: list = []

    def walk(x, name):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(name)
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{name}.{k}" if name else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{name}[{i}]") for i, v in enumerate(x)]
        return x
    return walk(obj, ""), bad


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 1, allow_nan: bool = False) -> Path:
    """Strict JSON (no NaN/Infinity tokens: non-finite numbers are written as null), or with
    allow_nan=True Python's JSON, whose NaN and Infinity tokens json.loads reads back (result files
    where an infinite score means something, such as the PSNR of a perfect render)."""
    clean = obj if allow_nan else strict(obj)[0]
    return write_bytes(path, json.dumps(clean, indent=indent, allow_nan=allow_nan) + "\n")


# ---------------------------------------------------------------------------------------------
# Tensors: safetensors, and torch files read without unpickling
# ---------------------------------------------------------------------------------------------


def state_digest(obj: Any) -> str:
    """sha256 of a nested structure of tensors, numbers, strings, lists and dicts (dtype, shape and the
    raw bytes of every tensor; dict keys in sorted order). Equal structures give equal digests."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}".encode())
            for v in x:
                walk(v)
        elif isinstance(x, (str, bytes)):
            b = x.encode() if isinstance(x, str) else x
            h.update(f"{'S' if isinstance(x, str) else 'B'}{len(b)}:".encode() + b)
        elif x is None or isinstance(x, (bool, int, float)):
            h.update(f"{type(x).__name__}:{x!r};".encode())
        else:
            raise TypeError(f"state_digest: unsupported type {type(x).__name__}")
    walk(obj)
    return h.hexdigest()


def _unshared(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (G3DR's decoder is reachable under two names):
    later names get a copy."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and key in seen:
            v = v.clone()
        seen.add(key)
        out[k] = v
    return out


def save_tensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Path:
    """Tensors + string metadata -> a .safetensors file (atomic)."""
    data = safetensors_bytes(_unshared(tensors), metadata={k: str(v) for k, v in metadata.items()})
    return write_bytes(path, data)


def load_tensors(path: PathLike, device="cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """A .safetensors file -> (tensors, metadata); ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        if is_pickle(path):
            raise UnsafeFileError(convert_hint(path, path.with_suffix(".safetensors"))) from None
        raise ValueError(f"cannot read {path}: not a valid safetensors file (truncated or damaged?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return tensors, meta


def is_pickle(path: PathLike) -> bool:
    """True for a file torch.save or pickle wrote: a zip archive holding a data.pkl, or a raw pickle
    (protocol 2-5). Looked at only after the file failed to load as what it should be."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("data.pkl") for n in z.namelist())
        with open(path, "rb") as f:
            head = f.read(2)
    except (OSError, zipfile.BadZipFile):
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def torch_load(path: PathLike, map_location="cpu") -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings and containers only. A file that
    needs a full unpickler raises UnsafeFileError (never runs it); a damaged file raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if is_pickle(path):  # a well-formed pickle that needs more than tensors and containers
            raise UnsafeFileError(convert_hint(path, path.with_name(path.stem + ".safe" + path.suffix))) from None
        raise ValueError(f"cannot read {path} (truncated or damaged?): {str(e).splitlines()[0]}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {path} (truncated or damaged?): {first}") from None
