"""G3DR (Reddy, Elezi, Deng, CVPR 2024) on top of g3dr_kernels."""
__version__ = "0.1.0"
