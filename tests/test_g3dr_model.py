"""f_trigen and the G3DR module; official-checkpoint loading; the frozen loss networks' loading."""
import warnings

import pytest
import torch

from g3dr import cameras
from g3dr.config import apply_overrides, preset
from g3dr.losses import Criterion, MissingWeightsError, load_clip, load_lpips, tv_loss
from g3dr.model import G3DR, load_official_checkpoint, official_to_ours


def test_official_preset_has_the_official_size():
    with torch.device("meta"):
        m = G3DR(preset("official"))
    n = sum(p.numel() for p in m.generator.parameters())
    assert 145e6 < n < 150e6  # "about 147M parameters with width 128, mults 1,2,4,8"
    assert m.generator.final_conv.out_channels == 3 * 64 and m.generator.pos_embed.shape == (1, 256, 128, 128)


def test_forward_shapes_and_every_parameter_gets_a_gradient():
    cfg = preset("tiny")
    m = G3DR(cfg)
    img, dep = torch.rand(2, 3, 16, 16), 4 + 2 * torch.rand(2, 1, 16, 16)
    o, d = cameras.canonical_rays(cfg, 2)
    out = m(img, dep, o, d, target_depth=dep.reshape(2, -1))
    assert out["planes"].shape == (2, 3, 8, 16, 16) and out["rgb"].shape == (2, 256, 3)
    assert out["depth"].shape == out["opacity"].shape == (2, 256)
    (out["rgb"].mean() + out["depth"].mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing  # DDP needs every parameter in the one forward


def test_fused_and_reference_backends_agree_inside_the_model():
    cfg = apply_overrides(preset("tiny"), ["render.perturb=false"])
    ref_cfg = apply_overrides(cfg, ["render.backend=torch"])
    m, m_ref = G3DR(cfg), G3DR(ref_cfg)
    m_ref.load_state_dict(m.state_dict())
    img, dep = torch.rand(1, 3, 16, 16), 4 + 2 * torch.rand(1, 1, 16, 16)
    o, d = cameras.canonical_rays(cfg, 1)
    a = m(img, dep, o, d, target_depth=dep.reshape(1, -1), generator=torch.Generator().manual_seed(1))
    b = m_ref(img, dep, o, d, target_depth=dep.reshape(1, -1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["rgb"], b["rgb"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["depth"], b["depth"], atol=1e-4, rtol=1e-4)


def _as_official(state):
    inv = {"decoder.weight1": "decoder.net.0.weight", "decoder.bias1": "decoder.net.0.bias",
           "decoder.weight2": "decoder.net.2.weight", "decoder.bias2": "decoder.net.2.bias"}
    return {"module." + inv.get(k, k[len("generator."):]): v for k, v in state.items() if not k.startswith("renderer.")}


def test_official_checkpoint_loading(tmp_path):
    cfg = preset("tiny")
    src = G3DR(cfg)
    official = _as_official(src.state_dict())
    assert "module.downs.0.2.fn.fn.to_qkv.weight" in official and "module.decoder.net.2.bias" in official
    torch.save({"step": 7, "model": official, "opt": {}}, tmp_path / "checkpoint_generic.pt")
    dst = G3DR(cfg)
    load_official_checkpoint(dst, tmp_path / "checkpoint_generic.pt")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert set(official_to_ours(official)) == set(src.state_dict())
    # missing / unexpected / wrong-shape keys are listed
    broken = dict(official)
    broken.pop("module.final_conv.weight")
    broken["module.extra.weight"] = torch.zeros(1)
    broken["module.init_conv.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_official_checkpoint(G3DR(cfg), {"model": broken})
    msg = str(e.value)
    assert "generator.final_conv.weight" in msg and "generator.extra.weight" in msg and "init_conv.bias" in msg


def test_lpips_weights_loading(tmp_path):
    cfg = preset("tiny").loss
    cfg.allow_random_init = False
    cfg.vgg_weights = str(tmp_path / "missing.pth")
    with pytest.raises(MissingWeightsError, match="missing.pth"):
        load_lpips(cfg)
    import torchvision
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16-397923af.pth")
    cfg.vgg_weights = str(tmp_path / "vgg16-397923af.pth")
    net = load_lpips(cfg)
    torch.testing.assert_close(net.net.slice3.state_dict()["12.weight"], vgg.features[12].weight)
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(1, 3, 32, 32)
    assert net(x * 2 - 1, x * 2 - 1).abs().max() == 0


def test_lpips_without_weights_needs_explicit_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = preset("tiny").loss
    cfg.allow_random_init = False
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        load_lpips(cfg)
    cfg.allow_random_init = True
    with pytest.warns(UserWarning, match="RANDOM"):
        load_lpips(cfg)


def test_clip_loading_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = preset("tiny").loss
    cfg.clip_model, cfg.allow_random_init = "g3dr-tiny-vit", False
    with pytest.raises(MissingWeightsError, match="clip_weights"):
        load_clip(cfg)
    cfg.allow_random_init = True
    with pytest.warns(UserWarning, match="RANDOM"):
        visual = load_clip(cfg)
    # a local checkpoint file is loaded as given
    import open_clip
    full = open_clip.create_model("g3dr-tiny-vit", pretrained=None)
    torch.save(full.state_dict(), tmp_path / "tiny_clip.pt")
    cfg.clip_weights, cfg.allow_random_init = str(tmp_path / "tiny_clip.pt"), False
    visual = load_clip(cfg)
    torch.testing.assert_close(visual.conv1.weight, full.visual.conv1.weight)
    cfg.clip_weights = str(tmp_path / "nope.pt")
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        load_clip(cfg)


def test_criterion_terms_by_branch():
    cfg = apply_overrides(preset("tiny"), ["loss.clip_model=g3dr-tiny-vit", "loss.w_clip_novel=0.35",
                                           "loss.w_clip_canon=0.2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crit = Criterion(cfg.loss, need_lpips=True, need_clip=True)
    img = torch.rand(2, 3, 16, 16)
    dep = 4 + torch.rand(2, 1, 16, 16)
    out = {"rgb": img.clone().requires_grad_(), "depth": dep.clone(), "opacity": torch.ones(2, 1, 16, 16)}
    w = {"canon": {"recon": 1.0, "depth": 2.0, "lpips": 1.0, "clip": 0.2}, "novel": {"clip": 0.35, "lpips": 2.0,
                                                                                     "tv": 0.1}, "opacity": 1.0}
    t = crit("canon", out, img, dep, w)
    assert set(t) == {"recon", "depth", "lpips", "clip", "opacity", "total"}
    assert float(t["recon"]) == 0 and float(t["depth"]) == 0 and float(t["opacity"]) == 0
    assert float(t["lpips"]) == pytest.approx(0, abs=1e-6) and float(t["clip"]) == pytest.approx(0, abs=1e-6)
    out["rgb"] = (1 - img).requires_grad_()
    t = crit("novel", out, img, dep, w)
    assert set(t) == {"tv", "lpips", "clip", "opacity", "total"} and float(t["total"]) > 0
    t["total"].backward()
    assert out["rgb"].grad.abs().sum() > 0
    assert float(tv_loss(torch.ones(1, 1, 4, 4))) == 0
