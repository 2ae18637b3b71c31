"""G3DR (Reddy, Elezi, Deng, CVPR 2024) on top of g3dr_kernels.

    import g3dr
    model = g3dr.load("runs/x")                    # run folder or checkpoint
    planes = model.reconstruct(image, depth)       # [1,3,H,W] in [0,1], [1,1,H,W] in G3DR units
    views = model.render(planes, (yaw, pitch))     # {"rgb", "depth", "opacity"}
"""
__version__ = "0.1.0"


def load(ckpt, device=None, backend=None):
    """A trained G3DR from a run folder or checkpoint file (see g3dr.infer.load)."""
    from .infer import load as _load  # here: `import g3dr` (and so `g3dr --help`) does not import torch
    return _load(ckpt, device, backend)
