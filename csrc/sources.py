"""The one list of sources and flags for the compiled extension `g3dr_kernels._C`.

Read by setup.py (import) and CMakeLists.txt (`python csrc/sources.py --cmake`). Sources are every
.cpp under csrc/ (C++ and CPU kernels, always built) and every .cu under csrc/cuda/ (built when CUDA
is enabled). Shared per-sample math lives in csrc/include/g3dr/*.h (host+device inline functions).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent
EXT_NAME = "g3dr_kernels._C"
INCLUDE_DIRS = [CSRC / "include"]
# OpenMP: at::parallel_for is inline code that runs serially unless the extension itself is compiled
# with OpenMP (torch's CPU backend is OpenMP; it ships libgomp.so.1, so linking it loads nothing new).
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3"] + OPENMP_FLAGS  # the C++ standard is the one torch requires (C++20 for torch 2.15)
LINK_FLAGS = OPENMP_FLAGS
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# Architectures compiled when TORCH_CUDA_ARCH_LIST is unset: Ampere and Hopper (H100/H200).
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cpp_sources() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*.cpp"))


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit that `nvcc` belongs to (following wrapper scripts and
    links), else /usr/local/cuda; None when there is no toolkit with headers."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        cands.insert(2, str(real.parent.parent))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists() and (Path(c) / "bin" / "nvcc").exists():
            return str(Path(c))
    return None


def cuda_wanted() -> bool:
    """G3DR_CUDA=1 requires CUDA (error if impossible), 0 disables it; unset: on when a toolkit and
    a CUDA-enabled torch are both present. Never fails the build when unset."""
    flag = os.environ.get("G3DR_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    import torch
    ok = find_cuda_home() is not None and torch.version.cuda is not None
    if flag in ("1", "on", "true", "yes") and not ok:
        raise RuntimeError("G3DR_CUDA=1 but no CUDA toolkit (nvcc + headers) or no CUDA-enabled torch was found; "
                           "set CUDA_HOME or unset G3DR_CUDA for a CPU-only build")
    return ok


if __name__ == "__main__":
    # For CMake: semicolon-separated lists.
    what = sys.argv[1] if len(sys.argv) > 1 else "--cmake"
    if what == "--cpp":
        print(";".join(str(p) for p in cpp_sources()), end="")
    elif what == "--cuda":
        print(";".join(str(p) for p in cuda_sources()), end="")
    elif what == "--cxx-flags":
        print(";".join(CXX_FLAGS), end="")
    elif what == "--link-flags":
        print(";".join(LINK_FLAGS), end="")
    elif what == "--nvcc-flags":
        print(";".join(NVCC_FLAGS), end="")
    elif what == "--archs":
        print(os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS), end="")
    elif what == "--cuda-home":
        print(find_cuda_home() or "", end="")
    else:
        raise SystemExit(f"unknown option {what}")
