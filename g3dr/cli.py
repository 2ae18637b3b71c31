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
    d = sub.add_parser("demo", help="G3DR end to end on built-in scenes: train briefly, reconstruct, render, export, "
                                     "score against ground truth, time the kernels")
    d.add_argument("--out", default="outputs/demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="the tiny preset, a few steps (seconds)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 60, quick: 3)")
    d.add_argument("--frames", type=int, default=None, help="turntable frames (default: 36, quick: 8)")
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton", "cuda"])
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--no-timings", action="store_true", help="skip the kernel timing table")
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
        for name in ("steps", "frames"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        run_demo(args.out, quick=args.quick, steps=args.steps, device=args.device, backend=args.backend,
                 frames=args.frames, timings=not args.no_timings)
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
