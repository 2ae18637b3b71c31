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
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import cameras, checkpoint, metrics, runs, schedules
from .config import Config, save_yaml
from .data import StepBatchSampler, build_dataset
from .devices import pick_device
from .files import atomic_write, write_png
from .losses import Criterion, needs
from .model import G3DR


RunFolderError = runs.RunFolderError  # the folder holds a run (or another training holds it)


def train(cfg: Config, out_dir, resume: str = "auto", overwrite: bool = False, progress: bool = True,
          max_steps: Optional[int] = None, init: Optional[str] = None) -> Dict:
    """Train G3DR with `cfg` into run folder `out_dir`. resume: "auto" (continue the run's newest valid
    checkpoint when there is one, else start fresh), "never", or a checkpoint path; overwrite replaces
    the run (after everything is validated). max_steps stops early (for tests) without changing the
    schedule. init: a model file, checkpoint or run folder whose weights start a new run (fine-tuning;
    fresh optimizer and schedule; ignored when resuming). The folder is locked for the run (g3dr/runs.py).
    Returns a summary dict (final step, skipped steps, last losses)."""
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if _dist_env()[1] != 0:
        return _train(cfg, out_dir, resume, overwrite, progress, max_steps, init)
    with runs.RunLock(out_dir):
        return _train(cfg, out_dir, resume, overwrite, progress, max_steps, init)


def _train(cfg: Config, out_dir, resume: str, overwrite: bool, progress: bool, max_steps: Optional[int],
           init: Optional[str] = None) -> Dict:
    run = setup(cfg, out_dir, resume, overwrite, progress, max_steps, init)
    ckpt = checkpoint.Checkpointer(run.out, cfg.train.keep_last)
    step, result = run.start, None
    with StopOnSignal() as stop, Log(run, progress) as log:
        for step, batch in zip(range(run.start, run.end), run.loader):
            result = train_step(run, step, batch)
            done = step + 1
            log.step(done, result)
            if run.main and (done % run.image_every == 0 or done == run.end):
                write_images(run, result, done)
            log.advance()
            if done % run.save_every == 0 or done == run.end or stop.signum is not None:
                save(run, ckpt, done)
            if stop.signum is not None:
                if run.main and progress:
                    print(f"\nsignal {stop.signum}: saved step {done} to {ckpt.last}; resume with --resume auto")
                break
        else:
            if run.start >= run.end and run.main and progress:
                print(f"nothing to do: the run is already at step {run.start} of {run.end}")
    final = step + 1 if run.end > run.start else run.start
    terms = result.terms if result is not None else {}
    return {"step": min(final, run.end), "skipped_steps": run.skipped, "run_dir": str(run.out),
            "losses": {k: float(v.detach()) for k, v in terms.items()}, "interrupted": stop.signum is not None}


# ---------------------------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """A training run between steps: what `setup` builds and every step reads (and `skipped`, which
    the steps count and checkpoints keep)."""
    cfg: Config
    out: Path
    world: int                  # processes (1 without torchrun)
    rank: int
    device: torch.device
    model: G3DR                 # the parameters; checkpoints hold its state dict
    ddp: torch.nn.Module        # `model` wrapped for DDP (the model itself on one process)
    opt: torch.optim.Optimizer
    criterion: Criterion
    loader: torch.utils.data.DataLoader
    autocast: Callable          # () -> the context a forward pass runs in (bf16 autocast or nothing)
    canon_rays: Tuple[torch.Tensor, torch.Tensor]  # the canonical view's rays for a full batch
    start: int                  # first step to run (the checkpoint's step when resuming)
    end: int                    # the step to stop at (train.steps, or max_steps when smaller)
    skipped: int                # steps skipped for a non-finite loss or gradient, over the whole run
    image_every: int
    save_every: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: Config, out_dir, resume: str, overwrite: bool, progress: bool, max_steps: Optional[int],
          init: Optional[str]) -> Run:
    """Everything a run needs before its first step: processes, model, optimizer, resumed state, data.
    Nothing in the run folder changes until every check has passed (runs.begin). The order of the
    random draws here is the order a resumed run must repeat, so it stays as it is."""
    world, rank, local_rank = _dist_env()
    device = _device(cfg, local_rank)
    runs.check_size(cfg, device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(out_dir)
    main = rank == 0
    resume_path, ck = _find_start(out, resume, overwrite, main, world)

    T, B = cfg.train.steps, cfg.train.batch_size
    torch.manual_seed(cfg.train.seed)
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
    sampler = StepBatchSampler(len(dataset), B, end, start, cfg.train.seed, cfg.data.flip, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda")
    return Run(cfg=cfg, out=out, world=world, rank=rank, device=device, model=model, ddp=ddp, opt=opt,
               criterion=criterion, loader=loader, autocast=autocast,
               canon_rays=cameras.canonical_rays(cfg, B, device=device), start=start, end=end, skipped=skipped,
               image_every=interval(cfg.train.image_every, T, 6), save_every=interval(cfg.train.save_every, T, 4))


def _find_start(out: Path, resume: str, overwrite: bool, main: bool, world: int):
    """(checkpoint path or None, the checkpoint when rank 0 loaded it already). Rank 0 decides and tells
    the others; it only reads: nothing in the folder changes before everything is validated."""
    resume_path = ck = None
    if main:
        resume_path, ck = runs.find_start(out, resume, overwrite)
    if world > 1:
        box = [str(resume_path) if resume_path else ""]
        dist.broadcast_object_list(box, src=0)
        resume_path = Path(box[0]) if box[0] else None
    return resume_path, ck


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.train.device != "auto":
        return pick_device(cfg.train.device, "train.device")
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


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


# ------------------------------------------------------------------------------------------- the step

@dataclass
class StepResult:
    """What one step leaves for the log and the pictures. Tensors become numbers only when logged, so a
    step that is not logged waits for nothing."""
    lr: float
    novel: bool                 # the branch: novel view (True) or canonical view
    grad_norm: torch.Tensor     # the total gradient norm before clipping
    terms: Dict[str, torch.Tensor]  # the loss terms, "total" among them
    res: Dict[str, torch.Tensor]    # the model's outputs: rgb, depth, opacity [b, H*W(, 3)], ...
    image: torch.Tensor         # the batch: [b, 3, H, W] in [0, 1]
    depth: torch.Tensor         # [b, 1, H, W] in G3DR units
    objects: Optional[torch.Tensor]  # object masks of synthetic data, else None
    images: int                 # images in the step over all processes


def train_step(run: Run, step: int, batch: Dict[str, torch.Tensor]) -> StepResult:
    """One optimisation step: the learning rate, the branch (canonical or novel, drawn from (seed, step)
    so every rank takes the same), forward, losses, backward, clipping, and the update, which is
    skipped on every rank (and counted) when any rank's loss or gradient is not finite."""
    cfg, seed, device = run.cfg, run.cfg.train.seed, run.device
    image = batch["image"].to(device, non_blocking=True)
    depth = batch["depth"].to(device, non_blocking=True)
    b, H = image.shape[0], cfg.model.image_size
    lr = schedules.learning_rate(cfg, step)
    for g in run.opt.param_groups:
        g["lr"] = lr
    novel = torch.rand((), generator=_gen("cpu", seed, step, 1)).item() < schedules.p_novel(cfg, step)
    if novel:  # cameras for the global batch, this rank's slice: the same views as one process would draw
        yaw, pitch = cameras.sample_novel(cfg, step, b * run.world, _gen("cpu", seed, step, 2))
        sl = slice(run.rank * b, (run.rank + 1) * b)
        rays_o, rays_d = cameras.rays(yaw[sl], pitch[sl], cfg, device=device)
        target = None
    else:
        rays_o, rays_d = run.canon_rays[0][:b], run.canon_rays[1][:b]
        target = depth.reshape(b, -1)
    if cfg.render.kernel_start > 0:
        run.model.set_kernel(schedules.kernel_on(cfg, step))
    with run.autocast():
        res = run.ddp(image, depth, rays_o, rays_d, target_depth=target,
                      generator=_gen(device, seed, step, 3, run.rank), return_weights=_needs_weights(cfg, novel))
        rendered = {k: _to_images(res[k], H, H) for k in ("rgb", "depth", "opacity")}
        rendered.update({k: res[k] for k in ("weights", "t_mid") if k in res})
        if novel and "weights" in res:  # what the input view says about the novel view's samples
            rendered.update(_input_view_masks(cfg, rays_o, rays_d, res["t_mid"], depth))
        terms = run.criterion("novel" if novel else "canon", rendered, image, depth, schedules.loss_weights(cfg, step))
    loss = terms["total"]
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    # the total gradient norm (clipped to train.grad_clip when > 0; inf = measure only)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip or float("inf"))
    if _finite_everywhere(run, loss, norm):
        run.opt.step()
    else:
        run.skipped += 1
        run.opt.zero_grad(set_to_none=True)
    return StepResult(lr=lr, novel=novel, grad_norm=norm, terms=terms, res=res, image=image, depth=depth,
                      objects=batch.get("objects"), images=b * run.world)


def _needs_weights(cfg: Config, novel: bool) -> bool:
    """Whether the step's losses need the per-sample weights: free space (canonical); carving or the
    opacity term restricted to rays that end behind the input's surface (novel)."""
    lo = cfg.loss
    return lo.w_carve > 0 or lo.novel_opacity == "behind" if novel else lo.w_free > 0


@torch.no_grad()
def _input_view_masks(cfg: Config, rays_o, rays_d, t_mid, depth) -> Dict[str, torch.Tensor]:
    """Novel-view samples classified by the input view: "empty" [B,R,S-1] (loss.w_carve) and, with
    loss.novel_opacity=behind, "ends_behind" [B,R] (the ray's last sample lies behind the input's surface)."""
    b, R, S = t_mid.shape
    pts = rays_o.float()[:, :, None] + t_mid[..., None] * rays_d.float()[:, :, None]
    empty, behind = cameras.input_view_regions(pts.reshape(b, R * S, 3), depth.float(), cfg, cfg.loss.free_margin)
    out = {"empty": empty.reshape(b, R, S)}
    if cfg.loss.novel_opacity == "behind":
        out["ends_behind"] = behind.reshape(b, R, S)[..., -1]
    return out


def _finite_everywhere(run: Run, loss: torch.Tensor, norm: torch.Tensor) -> bool:
    """Whether the loss and gradient norm are finite on every rank (so all ranks step, or none does)."""
    ok = torch.isfinite(loss.detach()) & torch.isfinite(norm)
    if run.world > 1:
        flag = ok.float().to(run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = flag > 0
    return bool(ok)


def _gen(device, *keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2 ** 63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def _to_images(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, H*W, D] or [B, H*W] -> [B, D, H, W]."""
    x = x if x.dim() == 3 else x[..., None]
    return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)


# ------------------------------------------------------------------------------------------- logging

class Log:
    """The run's record, kept by the main process: a stats.jsonl line (and TensorBoard scalars) every
    `log_every` steps and at the end, and the progress bar. A context manager: leaving closes them."""

    def __init__(self, run: Run, progress: bool):
        self.run, self.end = run, run.end
        self.every = interval(run.cfg.train.log_every, run.cfg.train.steps, 50)
        self.stats = open(run.out / "stats.jsonl", "a") if run.main else None
        self.tb = _tensorboard(run.out / "tb") if run.main else None
        self.bar = tqdm(total=run.end, initial=run.start, desc="train", dynamic_ncols=True) \
            if run.main and progress else None
        self.t_last, self.n_img = time.perf_counter(), 0  # images since the last line: the img/s

    def step(self, done: int, r: StepResult) -> None:
        """Count the step's images; write a line when one is due."""
        self.n_img += r.images
        if not (self.run.main and (done % self.every == 0 or done == self.end)):
            return
        now = time.perf_counter()
        rec = {"step": done, "lr": r.lr, "branch": "novel" if r.novel else "canon",
               "skipped_steps": self.run.skipped, "grad_norm": float(r.grad_norm),
               "img_per_s": self.n_img / max(now - self.t_last, 1e-9),
               **{k: float(v.detach()) for k, v in r.terms.items()},
               **_diagnostics(r.res, r.depth, r.objects, not r.novel)}
        self.t_last, self.n_img = now, 0
        runs.write_stats(self.stats, rec)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, done)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in r.terms.items()} |
                                 {"img/s": f"{rec['img_per_s']:.1f}", "skip": self.run.skipped})

    def advance(self) -> None:
        """Move the progress bar one step."""
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc) -> None:
        for f in (self.bar, self.stats, self.tb):
            if f is not None:
                f.close()


def _tensorboard(folder: Path):
    """A TensorBoard writer, or None when tensorboard is not installed (stats.jsonl only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard is no dependency
        return SummaryWriter(str(folder))
    except Exception:
        return None


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


class StopOnSignal:
    """SIGTERM and SIGINT set `signum` instead of killing the run: the loop finishes the step, saves and
    stops. Handlers can only be installed from the main thread; elsewhere signals keep their handlers."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: Dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if threading_main():
            self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------- pictures and checkpoints

def write_images(run: Run, r: StepResult, done: int) -> None:
    """images/step_XXXXXXXX.png (the batch's reconstructions) and curves.png (from stats.jsonl)."""
    _grid_image(run.model, run.cfg, r.image, r.depth, run.out / "images" / f"step_{done:08d}.png", run.device)
    plot_curves(run.out / "stats.jsonl", run.out / "curves.png")


def save(run: Run, ckpt: checkpoint.Checkpointer, step_done: int) -> None:
    """checkpoints/step_XXXXXXXX.pt and last.pt (main process only): model, optimizer, config, every
    random-number state and the skipped-step count, all that an exact resume needs."""
    if run.main:
        ckpt.save({"step": step_done, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                   "config": run.cfg.to_dict(), "rng": checkpoint.rng_state(), "skipped_steps": run.skipped,
                   "world_size": run.world})


def _grid_image(model: G3DR, cfg: Config, image, depth, path: Path, device) -> None:
    """input | canonical render | canonical depth | novel render (yaw +0.3) | novel depth, one row per item."""
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
    write_png(path, arr)


CURVES = (("loss terms", ("total", "recon", "depth", "free", "lpips", "clip", "tv", "opacity", "carve")),
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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    finally:
        plt.close(fig)
    return path
