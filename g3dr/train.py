"""G3DR training: one readable loop. One CPU, one GPU, or many with torchrun (DDP detected from
the environment: NCCL on GPU, gloo on CPU).

Everything random is a pure function of (seed, step[, rank]): the data order and flips
(g3dr/data.py), the branch (canonical or novel, the same on every rank), the novel cameras (drawn
for the global batch, sliced per rank) and the renderer's sample jitter. With the model and
optimizer restored from `last.pt`, a resumed run continues exactly as if never stopped.

Run folder: config.yaml, stats.jsonl, checkpoints/{last.pt, step_*.pt}, images/, tb/ (when
TensorBoard is installed).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import cameras, checkpoint, metrics, runs, schedules
from .config import Config, save_yaml
from .data import StepBatchSampler, build_dataset
from .losses import Criterion, needs
from .model import G3DR


RunFolderError = runs.RunFolderError  # the folder holds a run (or another training holds it)


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.train.device != "auto":
        from .infer import pick_device
        return pick_device(cfg.train.device, "train.device")
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _gen(device, *keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2 ** 63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def _to_images(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, H*W, D] or [B, H*W] -> [B, D, H, W]."""
    x = x if x.dim() == 3 else x[..., None]
    return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)


def _grid_image(model: G3DR, cfg: Config, image, depth, path: Path, device) -> None:
    """input | canonical render | canonical depth | novel render (yaw +0.3) | novel depth, one row per item."""
    from PIL import Image
    n, H = min(4, image.shape[0]), cfg.model.image_size
    with torch.no_grad():
        planes = model.planes(image[:n], depth[:n])
        cols = [image[:n]]
        for yaw in (cameras.CANONICAL_YAW, cameras.CANONICAL_YAW + 0.3):
            o, d = cameras.rays(torch.full((n,), yaw), torch.full((n,), cameras.CANONICAL_PITCH), cfg, device=device)
            out = model.renderer(planes, o, d)
            dep = _to_images(out.depth, H, H)
            dep = ((dep - 4) / 2).clamp(0, 1)  # the G3DR depth range [4, 6] -> black..white
            cols += [_to_images(out.rgb, H, H).clamp(0, 1), dep.expand(-1, 3, -1, -1)]
        dep_in = ((depth[:n] - 4) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
        cols.insert(1, dep_in)
        grid = torch.cat([torch.cat(list(c), 1) for c in cols], 2)  # rows = items, columns = panels
    arr = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)


def interval(every: int, steps: int, parts: int = 10) -> int:
    """A logging/image/checkpoint interval for a run of `steps` steps: the configured one, shortened so
    that a short run still gets about `parts` of them."""
    return max(1, min(every, steps // parts))


def init_weights(model: G3DR, source) -> int:
    """Copy the weights of a model file, checkpoint or run folder into `model` (`train --init`: fine-tuning
    with a fresh optimizer). The architectures must match. Returns the step the source was trained to."""
    ck = checkpoint.load(source, map_location="cpu")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"--init {source}: its weights do not fit this config's model ({first[0][:200]}); "
                         f"train with the config it was made with (its config.yaml)") from None
    return int(ck.get("step", 0))


def _diagnostics(res: Dict[str, torch.Tensor], depth: torch.Tensor, objects: Optional[torch.Tensor],
                 canonical: bool) -> Dict[str, float]:
    """Per-step numbers that show collapse early: opacity statistics, and on canonical steps the depth
    error on object and background pixels and the fog fraction (metrics.depth_split)."""
    op = res["opacity"].detach()
    out = {"opacity_mean": float(op.mean()), "opacity_lo": float((op < 0.5).float().mean())}
    if canonical:
        out.update(metrics.depth_split(res["depth"], depth.reshape(depth.shape[0], -1),
                                       None if objects is None else objects.reshape(objects.shape[0], -1)))
    return out


def train(cfg: Config, out_dir, resume: str = "auto", overwrite: bool = False, progress: bool = True,
          max_steps: Optional[int] = None, init: Optional[str] = None) -> Dict:
    """Train G3DR with `cfg` into run folder `out_dir`. resume: "auto" (continue the run's newest valid
    checkpoint when there is one, else start fresh), "never", or a checkpoint path; overwrite replaces
    the run (after everything is validated). max_steps stops early (for tests) without changing the
    schedule. init: a model file, checkpoint or run folder whose weights start a new run (fine-tuning;
    fresh optimizer and schedule; ignored when resuming). The folder is locked for the run (g3dr/runs.py). Returns a summary dict (final step,
    skipped steps, last losses)."""
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if _dist_env()[1] != 0:
        return _train(cfg, out_dir, resume, overwrite, progress, max_steps, init)
    with runs.RunLock(out_dir):
        return _train(cfg, out_dir, resume, overwrite, progress, max_steps, init)


def _train(cfg: Config, out_dir, resume: str, overwrite: bool, progress: bool, max_steps: Optional[int],
           init: Optional[str] = None) -> Dict:
    world, rank, local_rank = _dist_env()
    device = _device(cfg, local_rank)
    runs.check_size(cfg, device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(out_dir)
    main = rank == 0
    resume_path = ck = None
    if main:  # reads only: nothing in the folder changes before everything is validated (runs.begin)
        resume_path, ck = runs.find_start(out, resume, overwrite)
    if world > 1:
        box = [str(resume_path) if resume_path else ""]
        dist.broadcast_object_list(box, src=0)
        resume_path = Path(box[0]) if box[0] else None

    T, B = cfg.train.steps, cfg.train.batch_size
    seed = cfg.train.seed
    torch.manual_seed(seed)
    dataset = build_dataset(cfg)
    model = G3DR(cfg).to(device)
    if cfg.train.channels_last:
        model.generator.to(memory_format=torch.channels_last)
    if init is not None and resume_path is None:
        init_weights(model, init)
        if main and progress:
            print(f"initialised the weights from {init}")
    opt = torch.optim.Adam(model.parameters(), lr=schedules.learning_rate(cfg, 0), betas=cfg.schedule.betas)
    start, skipped = 0, 0
    if resume_path is not None:
        ck = ck if ck is not None else checkpoint.load(resume_path, map_location="cpu")
        runs.check_resumable(ck, cfg, resume_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, skipped = ck["step"], ck.get("skipped_steps", 0)
        if main and progress:
            print(f"resumed from {resume_path} at step {start}")
    if cfg.train.compile:  # compile the U-Net's forward in place: parameter names (and checkpoints) unchanged
        model.generator.forward = torch.compile(model.generator.forward)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    need = needs(cfg)
    want_weights = cfg.loss.w_free > 0
    criterion = Criterion(cfg.loss, need["lpips"], need["clip"]).to(device)
    if main:  # only now that everything is built and validated: replace / trim the previous run
        runs.begin(out, start, overwrite)
        save_yaml(cfg, out / "config.yaml")
    if world > 1:
        dist.barrier()
    amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext

    if resume_path is not None:  # after every network is built, so their random init matches a fresh run
        checkpoint.set_rng_state(ck["rng"])
    end = T if max_steps is None else min(T, max_steps)
    sampler = StepBatchSampler(len(dataset), B, end, start, seed, cfg.data.flip, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda")
    H = cfg.model.image_size
    canon_o, canon_d = cameras.canonical_rays(cfg, B, device=device)
    ckpt = checkpoint.Checkpointer(out, cfg.train.keep_last)
    log_every, image_every, save_every = (interval(cfg.train.log_every, T, 50), interval(cfg.train.image_every, T, 6),
                                          interval(cfg.train.save_every, T, 4))
    stats_f = open(out / "stats.jsonl", "a") if main else None
    writer = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed: stats.jsonl only
            writer = None

    stop = {"signal": None}

    def _on_signal(signum, frame):  # finish the step, save, exit
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading_main() else {}

    def save(step_done: int) -> None:
        if main:
            ckpt.save({"step": step_done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "config": cfg.to_dict(), "rng": checkpoint.rng_state(), "skipped_steps": skipped,
                       "world_size": world})

    bar = None
    if main and progress:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=start, desc="train", dynamic_ncols=True)
    terms: Dict[str, torch.Tensor] = {}
    step = start
    t_last, n_img = time.perf_counter(), 0
    try:
        for step, batch in zip(range(start, end), loader):
            image = batch["image"].to(device, non_blocking=True)
            depth = batch["depth"].to(device, non_blocking=True)
            b = image.shape[0]
            lr = schedules.learning_rate(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            novel = torch.rand((), generator=_gen("cpu", seed, step, 1)).item() < schedules.p_novel(cfg, step)
            if novel:
                yaw, pitch = cameras.sample_novel(cfg, step, b * world, _gen("cpu", seed, step, 2))
                sl = slice(rank * b, (rank + 1) * b)
                rays_o, rays_d = cameras.rays(yaw[sl], pitch[sl], cfg, device=device)
                target = None
            else:
                rays_o, rays_d = canon_o[:b], canon_d[:b]
                target = depth.reshape(b, -1)
            if cfg.render.kernel_start > 0:
                model.set_kernel(schedules.kernel_on(cfg, step))
            with autocast():
                res = ddp(image, depth, rays_o, rays_d, target_depth=target,
                          generator=_gen(device, seed, step, 3, rank), return_weights=want_weights and not novel)
                rendered = {k: _to_images(res[k], H, H) for k in ("rgb", "depth", "opacity")}
                rendered.update({k: res[k] for k in ("weights", "t_mid") if k in res})
                terms = criterion("novel" if novel else "canon", rendered, image, depth,
                                  schedules.loss_weights(cfg, step))
            objects = batch.get("objects")
            loss = terms["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # the total gradient norm (clipped to train.grad_clip when > 0; inf = measure only)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
            ok = torch.isfinite(loss.detach()) & torch.isfinite(norm)
            if world > 1:
                flag = ok.float().to(device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                ok = flag > 0
            if bool(ok):
                opt.step()
            else:
                skipped += 1
                opt.zero_grad(set_to_none=True)
            done = step + 1
            n_img += b * world
            if main:
                if done % log_every == 0 or done == end:
                    now = time.perf_counter()
                    rec = {"step": done, "lr": lr, "branch": "novel" if novel else "canon",
                           "skipped_steps": skipped, "grad_norm": float(norm),
                           "img_per_s": n_img / max(now - t_last, 1e-9),
                           **{k: float(v.detach()) for k, v in terms.items()},
                           **_diagnostics(res, depth, objects, not novel)}
                    t_last, n_img = now, 0
                    runs.write_stats(stats_f, rec)
                    if writer is not None:
                        for k, v in rec.items():
                            if isinstance(v, (int, float)) and k != "step":
                                writer.add_scalar(k, v, done)
                    if bar is not None:
                        bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in terms.items()} |
                                        {"img/s": f"{rec['img_per_s']:.1f}", "skip": skipped})
                if done % image_every == 0 or done == end:
                    _grid_image(model, cfg, image, depth, out / "images" / f"step_{done:08d}.png", device)
                    plot_curves(out / "stats.jsonl", out / "curves.png")
            if bar is not None:
                bar.update(1)
            if done % save_every == 0 or done == end or stop["signal"] is not None:
                save(done)
            if stop["signal"] is not None:
                if main and progress:
                    print(f"\nsignal {stop['signal']}: saved step {done} to {ckpt.last}; resume with --resume auto")
                break
        else:
            if start >= end and main and progress:
                print(f"nothing to do: the run is already at step {start} of {end}")
    finally:
        if bar is not None:
            bar.close()
        if stats_f is not None:
            stats_f.close()
        if writer is not None:
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    final = step + 1 if end > start else start
    return {"step": min(final, end), "skipped_steps": skipped, "run_dir": str(out),
            "losses": {k: float(v.detach()) for k, v in terms.items()}, "interrupted": stop["signal"] is not None}


CURVES = (("loss terms", ("total", "recon", "depth", "lpips", "clip", "tv", "opacity")),
          ("depth error (canonical)", ("depth_err_obj", "depth_err_bg")),
          ("fog and opacity", ("fog_obj", "behind_obj", "opacity_mean")),
          ("learning rate", ("lr",)))


def plot_curves(stats: Path, path: Path, smooth: int = 9) -> Optional[Path]:
    """stats.jsonl -> curves.png: loss terms, object/background depth error, fog and opacity, learning
    rate against the step (thin: every logged value; thick: a running median of `smooth`). Returns the
    path, or None when matplotlib is not installed or nothing was logged yet."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = []
    if stats.is_file():
        for line in stats.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    if not recs:
        return None
    import numpy as np
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for ax, (title, keys) in zip(axes, CURVES):
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if not pts:
                continue
            x, y = np.array(pts).T
            line, = ax.plot(x, y, lw=0.6, alpha=0.35)
            if len(y) >= smooth:
                med = np.array([np.median(y[max(0, i - smooth // 2):i + smooth // 2 + 1]) for i in range(len(y))])
                ax.plot(x, med, lw=1.6, color=line.get_color(), label=k)
            else:
                line.set_label(k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title.startswith("learning"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
