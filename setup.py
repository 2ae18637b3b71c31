"""Builds g3dr_kernels._C from csrc/ (see csrc/sources.py for the source list and flags).

Use `pip install --no-build-isolation -e .` so the extension is built against the torch you run.
G3DR_CUDA=0 builds CPU kernels only; G3DR_CUDA=1 requires CUDA; unset: CUDA when a toolkit is found.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "csrc"))
import sources as S  # noqa: E402

_cuda_home = S.find_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home  # before torch.utils.cpp_extension reads it
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", S.DEFAULT_CUDA_ARCHS)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _rel(paths):
    return [os.path.relpath(p, Path(__file__).resolve().parent) for p in paths]


def extensions():
    with_cuda = S.cuda_wanted()
    srcs = _rel(S.cpp_sources()) + (_rel(S.cuda_sources()) if with_cuda else [])
    kw = dict(include_dirs=[str(p) for p in S.INCLUDE_DIRS])
    if with_cuda:
        return [CUDAExtension(S.EXT_NAME, srcs, define_macros=[("G3DR_WITH_CUDA", "1")],
                              extra_compile_args={"cxx": S.CXX_FLAGS, "nvcc": S.NVCC_FLAGS},
                              extra_link_args=S.LINK_FLAGS, **kw)]
    return [CppExtension(S.EXT_NAME, srcs, extra_compile_args={"cxx": S.CXX_FLAGS}, extra_link_args=S.LINK_FLAGS,
                         **kw)]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
