"""Command line: thin argument parsing over Python functions a user can call too.

  g3dr demo                      the main job (see g3dr/demo.py)
  g3dr train --config P --data D --out RUN [key=value ...]   (torchrun ... -m g3dr train ... for DDP)
"""
from __future__ import annotations

import argparse
import sys


def _train_parser(sub):
    t = sub.add_parser("train", help="train G3DR (torchrun --nproc_per_node N -m g3dr train ... for DDP)",
                       description="Train G3DR. Any config field can be overridden as section.key=value, e.g. "
                                   "train.steps=1000 train.batch_size=4 train.save_every=100 loss.w_tv=0.")
    t.add_argument("--config", default="small", help="preset (official, paper, small, tiny) or a YAML file")
    t.add_argument("--data", default=None, help="'synthetic' or a folder of name.jpg + name_depth.png "
                                                "(default: the config's data.source)")
    t.add_argument("--out", required=True, help="run folder (config.yaml, stats.jsonl, checkpoints/, images/)")
    t.add_argument("--resume", default="auto", help="auto (continue the run in --out if any), never, or a checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this step without changing the schedule")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return t


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
    _train_parser(sub)
    args, extra = p.parse_known_args(argv)
    # section.key=value overrides may stand anywhere among the options
    bad = [x for x in extra if x.startswith("-") or "=" not in x or getattr(args, "cmd", None) != "train"]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.cmd == "demo":
        from .demo import run_demo
        for name in ("res", "views", "n_coarse"):
            if getattr(args, name) < (2 if name == "n_coarse" else 1):
                p.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
        run_demo(args.out, res=args.res, views=args.views, fov=args.fov, n_coarse=args.n_coarse, n_fine=args.n_fine,
                 backend=args.backend, device=args.device)
    elif args.cmd == "train":
        from .config import resolve
        from .train import RunFolderError, train
        overrides = list(args.overrides) + ([f"data.source={args.data}"] if args.data else [])
        try:
            cfg = resolve(args.config, overrides)
            summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                            max_steps=args.max_steps)
        except (ValueError, FileNotFoundError, RunFolderError) as e:
            print(f"g3dr train: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        if summary["interrupted"]:
            raise SystemExit(130)
        if not args.quiet:
            print(f"done: step {summary['step']} ({summary['skipped_steps']} skipped) -> {summary['run_dir']}")


if __name__ == "__main__":
    main()
