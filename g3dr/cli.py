"""Command line: thin argument parsing over Python functions a user can call too.

  g3dr demo [--quick]            the main job (see g3dr/demo.py)
  g3dr train --config P --data D --out RUN [key=value ...]   (torchrun ... -m g3dr train ... for DDP)
  g3dr render --ckpt RUN --input IMG|DIR --out DIR           views, video, depth maps, planes
  g3dr export --ckpt RUN --input IMG|planes.safetensors --out mesh.glb|scene.html  meshes, HTML viewer, depth mesh, voxels
  g3dr view --ckpt RUN --input IMG|DIR [--input ...] [--port 8080]   live browser viewer (viser)
  g3dr depth DIR --model DEPTH_MODEL_DIR                     name_depth.png for every image
  g3dr generate --prompt TEXT|--class N --ldm3d DIR --ckpt RUN --out DIR   text -> RGB-D -> 3D
  g3dr eval --ckpt RUN [--data synthetic|DIR] [--out DIR] | g3dr eval --ablation   metrics, eval.json
  g3dr convert OLD.pt NEW.pt|NEW.safetensors --trust        old pickled files -> formats that load safely

--ckpt takes a run folder, a checkpoint file (.pt) or a model file (.safetensors). A user error (a bad
value, path, device, a full disk, a permission) prints one line on stderr and exits with code 2.

Each command is a row of `COMMANDS`: its help, a function that adds its options, and a function that
runs it by calling the library. Those run functions import the library when they run, not at the top:
importing torch takes seconds, and `g3dr --help` or a mistyped option should not wait for it.
"""
from __future__ import annotations

import argparse
import sys

BACKENDS = ["auto", "torch", "cpu", "triton", "cuda"]


def main(argv=None) -> None:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # section.key=value overrides may stand anywhere among the options
    bad = [x for x in extra if x.startswith("-") or "=" not in x or getattr(args, "cmd", None) != "train"]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _dispatch(args, p)


def parser() -> argparse.ArgumentParser:
    """The `g3dr` parser: one sub-command per row of COMMANDS."""
    p = argparse.ArgumentParser(prog="g3dr", description="G3DR on fast triplane kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    return p


def _dispatch(args, p) -> None:
    """Run the parsed command. A user error prints one line on stderr and exits with code 2; anything
    else is a bug and keeps its traceback."""
    try:
        COMMANDS[args.cmd][2](args, p)
    except Exception as err:
        cpu_oom = isinstance(err, RuntimeError) and "can't allocate memory" in str(err)  # the CPU allocator's
        if not (isinstance(err, user_errors()) or cpu_oom):
            raise
        print(f"g3dr {args.cmd}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2)


def user_errors() -> tuple:
    """What a user can fix (a value, a path, a device, a full disk, a permission, memory): one line
    and exit code 2. Anything else is a bug and keeps its traceback."""
    import torch  # here, not at the top: see the module docstring
    from g3dr_kernels import BackendUnavailableError

    from .runs import RunFolderError
    return ValueError, OSError, RunFolderError, BackendUnavailableError, torch.OutOfMemoryError


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError names its file and, where there is one, the fix)."""
    if isinstance(err, OSError) and err.errno is not None and err.filename is not None:
        from .files import os_error_message  # imports torch: see the module docstring
        return os_error_message(err, err.filename)
    text = str(err)
    if isinstance(err, OSError) and len(err.args) == 2 and isinstance(err.args[1], str):
        text = err.args[1]  # OSError(errno, message): str() would prefix "[Errno N]"
    if type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text:
        text = f"out of memory ({text.strip().splitlines()[0] if text.strip() else ''}); use a smaller batch, " \
               f"resolution or --chunk"
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip()) or type(err).__name__


def _floats(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


# ------------------------------------------------------------------------------------------- demo

def _demo_args(d) -> None:
    d.add_argument("--out", default="outputs/demo", help="output folder")
    d.add_argument("--model", default=None, help="model file or run folder (default: the shipped models/ model)")
    d.add_argument("--train", action="store_true", help="train a model with the fast preset first (about 50 minutes on 2 "
                                                         "CPU cores; --steps to shorten)")
    d.add_argument("--quick", action="store_true", help="train the tiny preset for a few steps instead (seconds)")
    d.add_argument("--steps", type=int, default=None, help="training steps with --train/--quick (default: the "
                                                            "preset's; quick: 3)")
    d.add_argument("--scenes", type=int, default=8, help="held-out scenes to score")
    d.add_argument("--frames", type=int, default=None, help="turntable frames (default: 36, quick: 8)")
    d.add_argument("--backend", default="auto", choices=BACKENDS)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--no-timings", action="store_true", help="skip the kernel timing table")


def _run_demo(args, p) -> None:
    from .demo import run_demo
    for name in ("steps", "frames", "scenes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and not (args.train or args.quick):
        p.error("--steps needs --train or --quick (the default demo uses the shipped model)")
    run_demo(args.out, quick=args.quick, steps=args.steps, device=args.device, backend=args.backend,
             frames=args.frames, timings=not args.no_timings, train_model=args.train, model_path=args.model,
             scenes=args.scenes)


# ------------------------------------------------------------------------------------------ train

def _train_args(t) -> None:
    t.description = ("Train G3DR. Any config field can be overridden as section.key=value, e.g. "
                     "train.steps=1000 train.batch_size=4 train.save_every=100 loss.w_tv=0.")
    t.add_argument("--config", default="small", help="preset (official, paper, small, fast, fast-carve, tiny) or a YAML file")
    t.add_argument("--data", default=None, help="'synthetic' or a folder of name.jpg + name_depth.png "
                                                "(default: the config's data.source)")
    t.add_argument("--out", required=True, help="run folder (config.yaml, stats.jsonl, checkpoints/, images/)")
    t.add_argument("--resume", default="auto", help="auto (continue the run in --out if any), never, or a checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (never resumes; the old "
                   "run is removed only after the new config and data are checked)")
    t.add_argument("--max-steps", type=int, default=None, help="train this many steps: the same as train.steps=N "
                                                                 "(the schedule is fitted to N)")
    t.add_argument("--init", default=None, help="start from the weights of a model file, checkpoint or run folder "
                                                "(fine-tuning: fresh optimizer and schedule)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def _run_train(args, p) -> None:
    from .config import resolve
    from .train import train
    overrides = list(args.overrides) + ([f"data.source={args.data}"] if args.data else [])
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    overrides += [f"train.steps={args.max_steps}"] if args.max_steps is not None else []
    cfg = resolve(args.config, overrides)
    summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                    init=args.init)
    if summary["interrupted"]:
        raise SystemExit(130)
    if not args.quiet:
        print(f"done: step {summary['step']} ({summary['skipped_steps']} skipped) -> {summary['run_dir']}")


# ------------------------------------------------------------------------- render, export, view

def _input_args(q):
    q.add_argument("--ckpt", required=True, help="g3dr run folder, checkpoint (.pt) or model file (.safetensors)")
    q.add_argument("--depth", default=None, help="depth file for a single input (16-bit G3DR PNG or .npy); "
                                                 "default: name_depth.png beside the image")
    q.add_argument("--depth-model", default=None, help="local transformers depth model folder to estimate depth")
    q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    q.add_argument("--backend", default=None, choices=BACKENDS)


def _render_args(r) -> None:
    _input_args(r)
    r.add_argument("--input", required=True, help="an image or a folder of images")
    r.add_argument("--out", required=True, help="output folder (one subfolder per input)")
    r.add_argument("--trajectory", default="front", help="front (yaw +-0.25, pitch +-0.1), orbit, or yaw:pitch "
                                                         "offsets in radians, e.g. 0:0,0.3:0.1")
    r.add_argument("--frames", type=int, default=48, help="frames for front/orbit")
    r.add_argument("--resolution", type=int, default=None, help="output size (default: the training size)")
    r.add_argument("--n-coarse", type=int, default=None, help="samples per ray (default: twice the training count, "
                                                             "as G3DR.render)")
    r.add_argument("--n-fine", type=int, default=None, help="importance samples per ray (default: as G3DR.render)")
    r.add_argument("--sigma-scale", type=float, default=1.0, help="multiply the density field (paper Table S1)")
    r.add_argument("--chunk", type=int, default=16384, help="rays per render call (memory)")
    r.add_argument("--fps", type=float, default=12.0)


def _check_sizes(args, p) -> None:
    """render and export: counts and sizes that must be positive (a resolution or sample count >= 2)."""
    for name in ("frames", "resolution", "n_coarse", "chunk", "voxel_res"):
        v = getattr(args, name, None)
        if v is not None and v < (2 if name in ("n_coarse", "resolution", "voxel_res") else 1):
            p.error(f"--{name.replace('_', '-')} is too small: {v}")


def _run_render(args, p) -> None:
    from .infer import render_inputs
    _check_sizes(args, p)
    res = render_inputs(args.ckpt, args.input, args.out, depth=args.depth, depth_model_dir=args.depth_model,
                        trajectory_spec=args.trajectory, n_frames=args.frames, resolution=args.resolution,
                        n_coarse=args.n_coarse, n_fine=args.n_fine, sigma_scale=args.sigma_scale,
                        chunk=args.chunk, device=args.device, backend=args.backend, fps=args.fps)
    for item in res:
        print(f"{item['input']} -> {item['out']} ({item['mp4']}, {item['gif']})")


def _export_args(e) -> None:
    _input_args(e)
    e.add_argument("--input", required=True, help="an image (+ depth) or a planes.safetensors written by g3dr render")
    e.add_argument("--out", default=None, help="marching-cubes mesh file (.glb, .obj, .ply) or a self-contained "
                                               "WebGL viewer page (.html)")
    e.add_argument("--n-coarse", type=int, default=None, help=".html: coarse samples per ray (default: the config's)")
    e.add_argument("--n-fine", type=int, default=None, help=".html: importance samples per ray (default: the config's)")
    e.add_argument("--resolution", type=int, default=256, help="density grid resolution")
    e.add_argument("--iso", type=float, default=10.0, help="density level of the surface (per world unit)")
    e.add_argument("--crop", type=_floats, default=None, help="box x0,y0,z0,x1,y1,z1 (default: the scene box)")
    e.add_argument("--largest", action="store_true", help="keep the largest connected component only")
    e.add_argument("--decimate", type=int, default=None, help="target face count")
    e.add_argument("--depth-mesh", default=None, help="also write the canonical view as a depth mesh (.glb/.obj/.ply)")
    e.add_argument("--voxels", default=None, help="also write voxel occupancy (.npy/.npz/.binvox)")
    e.add_argument("--voxel-res", type=int, default=64)


def _run_export(args, p) -> None:
    from .infer import export_inputs
    _check_sizes(args, p)
    res = export_inputs(args.ckpt, args.input, args.out, depth=args.depth, depth_model_dir=args.depth_model,
                        resolution=args.resolution, iso=args.iso, crop=args.crop,
                        largest_component=args.largest, decimate=args.decimate,
                        depth_mesh_out=args.depth_mesh, voxels_out=args.voxels,
                        voxel_resolution=args.voxel_res, n_coarse=args.n_coarse, n_fine=args.n_fine,
                        device=args.device, backend=args.backend)
    for k, v in res.items():
        print(f"{k}: {v}")


def _view_args(v) -> None:
    _input_args(v)
    v.add_argument("--input", required=True, action="append",
                   help="an image, a folder of images, or a planes.pt of g3dr render (repeatable)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; 0.0.0.0 for all)")
    v.add_argument("--port", type=int, default=8080, help="port (the next free one if taken; 0: any free port)")
    v.add_argument("--out", default="outputs/view", help="folder for saved PNGs, meshes and HTML files")
    v.add_argument("--resolution", type=int, default=256, help="height of the sharpest resolution step")
    v.add_argument("--n-coarse", type=int, default=None, help="coarse samples per ray (default: the config's)")
    v.add_argument("--n-fine", type=int, default=None, help="importance samples per ray (default: the config's)")


def _run_view(args, p) -> None:
    from .view import serve
    if args.resolution < 8 or (args.n_coarse is not None and args.n_coarse < 2) or (args.n_fine or 0) < 0:
        p.error("--resolution must be >= 8, --n-coarse >= 2, --n-fine >= 0")
    serve(args.ckpt, args.input, host=args.host, port=args.port, out=args.out, depth=args.depth,
          depth_model_dir=args.depth_model, max_height=args.resolution, n_coarse=args.n_coarse,
          n_fine=args.n_fine, device=args.device, backend=args.backend)


# ------------------------------------------------------------------------------ depth, generate

def _depth_args(dp) -> None:
    dp.add_argument("input", help="folder of images (recursive)")
    dp.add_argument("--out", default=None, help="mirror the depth files under this folder (default: beside the images)")
    dp.add_argument("--model", required=True, help="local transformers depth model folder (e.g. Depth Anything V2)")
    dp.add_argument("--batch-size", type=int, default=8)
    dp.add_argument("--device", default=None)
    dp.add_argument("--overwrite", action="store_true", help="redo images whose depth file exists")


def _run_depth(args, p) -> None:
    from .depth import estimate_depth_folder
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    summary = estimate_depth_folder(args.input, args.out, model_dir=args.model, batch_size=args.batch_size,
                                    device=args.device, overwrite=args.overwrite)
    print(summary)
    if not summary.ok:
        raise SystemExit(1)


def _generate_args(g) -> None:
    g.add_argument("--prompt", default=None)
    g.add_argument("--class", dest="class_id", type=int, default=None, help="ImageNet class index (0-999)")
    g.add_argument("--ldm3d", required=True, help="local folder of diffusers' LDM3D pipeline (Intel/ldm3d-4c)")
    g.add_argument("--ckpt", required=True, help="g3dr run folder or checkpoint")
    g.add_argument("--out", required=True)
    g.add_argument("--name", default="generated")
    g.add_argument("--steps", type=int, default=50, help="denoising steps")
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--size", type=int, default=512, help="LDM3D image size (the RGB-D is resized to the model's)")
    g.add_argument("--frames", type=int, default=48)
    g.add_argument("--mesh", default=None, help="also export a mesh (.glb/.obj/.ply)")
    g.add_argument("--device", default=None)


def _run_generate(args, p) -> None:
    if (args.prompt is None) == (args.class_id is None):
        p.error("give exactly one of --prompt and --class")
    from .infer import generate_to_3d
    res = generate_to_3d(args.ldm3d, args.ckpt, args.out, prompt=args.prompt, class_id=args.class_id,
                         name=args.name, steps=args.steps, guidance=args.guidance, seed=args.seed,
                         size=args.size, n_frames=args.frames, mesh_out=args.mesh, device=args.device)
    for k, v in res.items():
        print(f"{k}: {v}")


# ------------------------------------------------------------------------------- eval, convert

def _eval_args(ev) -> None:
    ev.add_argument("--ckpt", default=None, help="g3dr run folder or checkpoint (not with --ablation)")
    ev.add_argument("--data", default="synthetic", help="'synthetic' (ground truth) or a folder of image + depth")
    ev.add_argument("--metrics", default=None, help="comma-separated subset: psnr,ssim,lpips,depth,nfs,"
                                                   "depth_accuracy,geometry,sigma_scaling,fid")
    ev.add_argument("--scenes", type=int, default=8, help="scenes (or folder images) to score")
    ev.add_argument("--sigma-scales", type=_floats, default=(1, 5, 10, 50))
    ev.add_argument("--inception", default=None, help="local Inception weights file for FID/KID/IS")
    ev.add_argument("--out", default=None, help="folder for eval.json (ablation: the report folder)")
    ev.add_argument("--device", default=None)
    ev.add_argument("--ablation", action="store_true", help="train with and without the depth kernel, score both")
    ev.add_argument("--steps", type=int, default=60, help="ablation: training steps per model")
    ev.add_argument("--batch", type=int, default=2, help="ablation: batch size")
    ev.add_argument("--train-scenes", type=int, default=16, help="ablation: training scenes")
    ev.add_argument("--variants", default="kernel,no_kernel,no_depth", help="ablation: kernel,no_kernel,no_depth")
    ev.add_argument("--seeds", default="420,421,422", help="ablation: training seeds per arm")
    ev.add_argument("--preset", default="fast", help="ablation: the preset every arm starts from")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="ablation: a config override for every arm (repeatable), e.g. --set model.image_size=32")
    ev.add_argument("--work", default="outputs/fidelity", help="ablation: folder for the training runs")


def _run_eval(args, p) -> None:
    if args.ablation:
        return _run_ablation(args)
    from .evaluate import evaluate, format_table
    if args.ckpt is None:
        p.error("--ckpt is required (or --ablation)")
    kw = {} if args.metrics is None else {"metrics": tuple(m for m in args.metrics.split(",") if m)}
    result = evaluate(args.ckpt, args.data, n_scenes=args.scenes, sigma_scales=args.sigma_scales,
                      out=args.out, device=args.device, inception=args.inception, **kw)
    print(format_table(result))


def _run_ablation(args) -> None:
    from .ablation import ablation, ablation_markdown
    report = ablation(args.out or "outputs/fidelity/report", args.work, steps=args.steps,
                      scenes=args.train_scenes, batch=args.batch,
                      variants=tuple(v for v in args.variants.split(",") if v),
                      seeds=tuple(int(x) for x in args.seeds.split(",") if x.strip()),
                      preset_name=args.preset, eval_scenes=args.scenes, sigma_scales=args.sigma_scales,
                      device=args.device, overrides=tuple(args.set))
    print(ablation_markdown(report))


def _convert_args(cv) -> None:
    cv.add_argument("old", help="old .pt file (g3dr checkpoint, planes.pt, or official G3DR checkpoint)")
    cv.add_argument("new", help="new file: .pt (checkpoint / state dict) or .safetensors (model or planes file)")
    cv.add_argument("--trust", action="store_true", help="I trust the source of OLD: loading it may run any code it "
                                                         "contains")


def _run_convert(args, p) -> None:
    from .checkpoint import convert
    res = convert(args.old, args.new, trust=args.trust)
    print(f"converted {args.old} ({res['kind']}) -> {res['out']}")


# name -> (help, add its options to a parser, run it with (parsed args, the g3dr parser)); in help order
COMMANDS = {
    "demo": ("G3DR end to end on held-out built-in scenes with the shipped model: reconstruct, render, export, "
             "score against ground truth, time the kernels", _demo_args, _run_demo),
    "train": ("train G3DR (torchrun --nproc_per_node N -m g3dr train ... for DDP)", _train_args, _run_train),
    "render": ("image(s) (+ depth) -> triplanes -> frames, mp4, GIF, 16-bit depth, planes.safetensors",
               _render_args, _run_render),
    "export": ("triplanes -> mesh (.glb/.obj/.ply), single-file viewer (.html), depth mesh, voxels "
               "(.npy/.npz/.binvox)", _export_args, _run_export),
    "view": ("live browser viewer (viser): orbit, zoom, RGB/depth/opacity, sigma scale, save PNG, export mesh "
             "and HTML", _view_args, _run_view),
    "depth": ("monocular depth for a folder of images -> name_depth.png (a training folder)", _depth_args,
              _run_depth),
    "generate": ("text or ImageNet class -> RGB-D (LDM3D) -> triplanes -> views, video, mesh", _generate_args,
                 _run_generate),
    "eval": ("score a checkpoint (novel-view PSNR/SSIM/LPIPS, depth error, NFS, depth accuracy, IoU/Chamfer, "
             "sigma scaling, FID/KID/IS); --ablation: the depth-kernel study", _eval_args, _run_eval),
    "convert": ("rewrite an old pickled checkpoint / planes.pt in a format that loads without unpickling "
                "(UNPICKLES the old file: only for files you trust)", _convert_args, _run_convert),
}


if __name__ == "__main__":
    main()
