"""Command line: `g3dr demo` (render the built-in scene and time the backends)."""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="g3dr", description="G3DR on fast triplane kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="render the built-in procedural scene on a turntable; time every backend")
    d.add_argument("--out", default="outputs/demo", help="output folder (PNG strip + GIF)")
    d.add_argument("--res", type=int, default=64, help="image resolution")
    d.add_argument("--views", type=int, default=8, help="turntable views")
    d.add_argument("--fov", type=float, default=30.0, help="vertical field of view, degrees")
    d.add_argument("--n-coarse", type=int, default=32)
    d.add_argument("--n-fine", type=int, default=32)
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton", "cuda"])
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run_demo
        for name in ("res", "views", "n_coarse"):
            if getattr(args, name) < (2 if name == "n_coarse" else 1):
                p.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
        run_demo(args.out, res=args.res, views=args.views, fov=args.fov, n_coarse=args.n_coarse, n_fine=args.n_fine,
                 backend=args.backend, device=args.device)


if __name__ == "__main__":
    main()
