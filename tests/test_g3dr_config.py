"""Config tree, presets, YAML round trip, overrides; schedules against the official formulas."""
import math

import pytest
import torch

from g3dr import schedules
from g3dr.config import PRESETS, Config, apply_overrides, load_yaml, preset, resolve, save_yaml


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_valid_and_yaml_round_trip(name, tmp_path):
    cfg = preset(name)
    save_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(tmp_path / "c.yaml")
    assert back == cfg
    assert resolve(str(tmp_path / "c.yaml")) == cfg


def test_official_and_paper_values():
    o, p = preset("official"), preset("paper")
    assert (o.model.base_width, o.model.width_mults, o.model.plane_channels, o.model.image_size) == (128, (1, 2, 4, 8),
                                                                                                     64, 128)
    assert (o.render.n_coarse, o.render.n_fine, o.render.fov, o.render.radius) == (32, 32, 18.0, 5.0)
    assert (o.loss.w_recon, o.loss.w_depth, o.loss.w_clip_novel, o.loss.w_tv, o.loss.w_lpips_novel) == (1, 2, .35, .1, 2)
    assert o.schedule.lr == 5e-5 and o.schedule.betas == (0.9, 0.99) and o.train.steps == 300_000
    assert (p.loss.w_recon, p.loss.w_depth, p.loss.w_lpips_canon, p.loss.w_clip_novel, p.loss.w_tv,
            p.loss.w_lpips_novel) == (1, 2, 0.5, 0.35, 0.1, 0.5)
    assert p.schedule.view_sampler == "gaussian" and p.loss.recon == "mse"


def test_overrides_convert_types():
    cfg = apply_overrides(preset("tiny"), ["train.steps=12", "loss.w_tv=0", "render.perturb=false",
                                           "model.width_mults=1,2", "schedule.betas=(0.8, 0.9)", "data.source=/x"])
    assert cfg.train.steps == 12 and cfg.loss.w_tv == 0.0 and cfg.render.perturb is False
    assert cfg.model.width_mults == (1, 2) and cfg.schedule.betas == (0.8, 0.9) and cfg.data.source == "/x"


@pytest.mark.parametrize("item,match", [("train.stepz=3", "unknown config field"), ("trian.steps=3", "unknown config section"),
                                        ("train.steps=abc", "train.steps"), ("train.steps=1.5", "train.steps"),
                                        ("render.perturb=maybe", "render.perturb"), ("steps", "section.key=value"),
                                        ("model.image_size=21", "multiple of"), ("render.sampling=best", "sampling"),
                                        ("train.amp=fp8", r"train\.amp must be 'auto', 'bf16' or 'off', got 'fp8'"),
                                        ("loss.recon=l2", r"loss\.recon must be 'l1' or 'mse', got 'l2'")])
def test_bad_overrides(item, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(preset("tiny"), [item])


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    (tmp_path / "bad.yaml").write_text("train:\n  nope: 1\n")
    with pytest.raises(ValueError, match="train.nope"):
        load_yaml(tmp_path / "bad.yaml")


# ---- schedules: the official formulas, written out (preddy5/G3DR train.py) ----------------------

def _linear_high2low(step, start, final, s0, s1):
    return max(final, start - ((start - final) * (step - s0) / (s1 - s0)))


def _linear_low2high(step, start, final, s0, s1):
    return min(final, start + ((final - start) * (step - s0) / (s1 - s0)))


@pytest.mark.parametrize("step", [0, 1, 999, 5000, 20_000, 60_000, 99_999, 100_000, 150_001, 299_999])
def test_official_schedules(step):
    cfg = preset("official")
    T = cfg.train.steps
    assert schedules.p_novel(cfg, step) == pytest.approx(min(0.4, 2 * step / T))
    assert schedules.yaw_range(cfg, step) == pytest.approx(math.pi / _linear_high2low(step, 24, 6, 0, T // 3))
    w = schedules.loss_weights(cfg, step)
    assert w["opacity"] == pytest.approx(_linear_low2high(step, 0, 1, 0, T // 2))
    late = step > T // 2
    assert w["canon"]["clip"] == pytest.approx(0.175 if late else 0) and w["canon"]["lpips"] == (1 if late else 0)
    assert w["novel"] == {"clip": 0.35, "lpips": 2.0, "tv": 0.1, "carve": 0.0}


def test_official_yaw_range_is_pi_over_d_not_linear_in_angle():
    # the official code widens the *denominator* linearly (24 -> 6); ours must follow it
    cfg = preset("official")
    mid = cfg.train.steps // 6
    assert schedules.yaw_range(cfg, mid) == pytest.approx(math.pi / 15)


@pytest.mark.parametrize("name", ["official", "small"])
def test_onecycle_matches_torch(name):
    cfg = apply_overrides(preset(name), ["train.steps=200"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.schedule.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.schedule.lr, total_steps=200,
                                                pct_start=cfg.schedule.warmup, div_factor=25)
    for step in range(200):
        assert schedules.learning_rate(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


def test_paper_lr_and_clip_ramp():
    cfg = preset("paper")
    assert schedules.learning_rate(cfg, 0) == pytest.approx(2e-6)
    assert schedules.learning_rate(cfg, 20_000) == pytest.approx(1e-4)
    assert schedules.learning_rate(cfg, 10_000) == pytest.approx((2e-6 + 1e-4) / 2)
    assert schedules.learning_rate(cfg, 400_000) == pytest.approx(0.0, abs=1e-12)
    assert schedules.loss_weights(cfg, 0)["novel"]["clip"] == pytest.approx(0.02)
    assert schedules.loss_weights(cfg, 50_000)["novel"]["clip"] == pytest.approx((0.02 + 0.35) / 2)
    assert schedules.loss_weights(cfg, 100_000)["novel"]["clip"] == pytest.approx(0.35)
    assert Config().schedule.lr_schedule == "onecycle"


def test_render_section_embeds_the_renderer_options():
    from g3dr_kernels.nn import RendererOptions
    from g3dr.model import G3DR
    cfg = preset("tiny")
    assert isinstance(cfg.render, RendererOptions)
    model = G3DR(cfg)
    # "replace": the fine samples become the target samples, so the renderer gets no extra ones
    assert model.renderer.options == RendererOptions.build(cfg.render, n_target=0)
    assert apply_overrides(cfg, ["render.ray_start=4", "render.ray_end=6"]).render.renderer_options().ray_end == 6.0
    with pytest.raises(ValueError, match=r"render\.ray_start < render\.ray_end"):
        apply_overrides(cfg, ["render.ray_start=4"])
    with pytest.raises(ValueError, match=r"render\.kernel_\*: kernel_s2 must be > 0"):
        apply_overrides(cfg, ["render.kernel_s2=0"])
