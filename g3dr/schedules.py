"""Schedules as pure functions of the step (0-based) and the config: nothing to save, nothing that
depends on the number of processes, so resume is exact. `T` is cfg.train.steps."""
from __future__ import annotations

import math

from .config import Config


def ramp(step: int, start_value: float, end_value: float, start_step: float, end_step: float) -> float:
    """Linear from start_value at start_step to end_value at end_step, constant outside."""
    if end_step <= start_step:
        return end_value if step >= start_step else start_value
    a = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return start_value + (end_value - start_value) * a


def p_novel(cfg: Config, step: int) -> float:
    """Probability of a novel-view step. Official: min(0.4, 2 step / T), i.e. tau = 0.4 reached at
    0.2 T (`schedule.p_novel_max`, `schedule.p_novel_ramp`)."""
    s = cfg.schedule
    return ramp(step, 0.0, s.p_novel_max, 0, s.p_novel_ramp * cfg.train.steps)


def yaw_range(cfg: Config, step: int) -> float:
    """Half-width of the uniform yaw offset, pi / d with d falling linearly from 24 to 6 over the first
    third (official; the *denominator* is linear, so the range widens slowly at first)."""
    s = cfg.schedule
    d = ramp(step, math.pi / s.yaw_range_start, math.pi / s.yaw_range_end, 0, s.yaw_range_ramp * cfg.train.steps)
    return math.pi / d


def loss_weights(cfg: Config, step: int) -> dict:
    """Weights of every loss term at `step`, by branch: {"canon": {...}, "novel": {...}, "opacity": w}."""
    lo, T = cfg.loss, cfg.train.steps
    canon_on = step >= lo.canon_perceptual_start * T
    return {
        "canon": {"recon": lo.w_recon, "depth": lo.w_depth, "free": lo.w_free,
                  "lpips": lo.w_lpips_canon if canon_on else 0.0, "clip": lo.w_clip_canon if canon_on else 0.0},
        "novel": {"clip": ramp(step, lo.clip_novel_start_weight, lo.w_clip_novel, 0, lo.clip_novel_ramp * T),
                  "lpips": lo.w_lpips_novel, "tv": lo.w_tv, "carve": lo.w_carve},
        "opacity": ramp(step, 0.0, lo.w_opacity, 0, lo.opacity_ramp * T),
    }


def kernel_on(cfg: Config, step: int) -> bool:
    """Whether the depth kernel scales gradients at `step` (render.depth_kernel after render.kernel_start)."""
    return cfg.render.depth_kernel and step >= cfg.render.kernel_start * cfg.train.steps


def learning_rate(cfg: Config, step: int) -> float:
    """Learning rate for the update made at `step`.
    onecycle (official, torch OneCycleLR with cosine annealing, two phases): lr/div_factor rising
      to lr over warmup*T steps, then falling to lr/div_factor/final_div_factor at the last step;
    warmup_cosine (paper): lr_start -> lr linearly over warmup*T steps, cosine to lr_end at T;
    constant: lr."""
    s, T = cfg.schedule, cfg.train.steps
    if s.lr_schedule == "constant":
        return s.lr
    if s.lr_schedule == "onecycle":
        initial, final = s.lr / s.div_factor, s.lr / s.div_factor / s.final_div_factor
        up_end = float(s.warmup * T) - 1  # OneCycleLR's phase boundary (total_steps = T)
        if step <= up_end:
            a = step / up_end if up_end > 0 else 1.0
            return final_cos(initial, s.lr, a)
        a = (step - up_end) / max(T - 1 - up_end, 1e-12)
        return final_cos(s.lr, final, min(a, 1.0))
    warm = s.warmup * T
    if step < warm:
        return s.lr_start + (s.lr - s.lr_start) * step / warm
    a = min((step - warm) / max(T - warm, 1), 1.0)
    return s.lr_end + 0.5 * (s.lr - s.lr_end) * (1 + math.cos(math.pi * a))


def final_cos(start: float, end: float, a: float) -> float:
    """Cosine interpolation from start (a = 0) to end (a = 1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * a) + 1)
