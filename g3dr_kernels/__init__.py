"""g3dr_kernels: fast, differentiable triplane rendering (multi-resolution sampling, decoder,
volume compositing with G3DR's depth-kernel gradient scaling).

Importing this package never compiles or loads the extension; see `backends()`.
"""
from ._backend import BackendUnavailableError, backends
from ._types import PLANE_AXES, Composite, DepthKernel
from ._validate import BACKENDS
from .functional import composite, render_triplanes, sample_triplanes

__all__ = ["sample_triplanes", "composite", "render_triplanes", "Composite", "DepthKernel", "backends",
           "BackendUnavailableError", "BACKENDS", "PLANE_AXES"]
__version__ = "0.1.0"
