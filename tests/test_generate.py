"""g3dr.generate: LDM3D text/class -> RGB-D, offline, with tiny random pipeline components.

The pipeline (tiny UNet2DConditionModel, 4-channel AutoencoderKL decoding RGB + depth, DDIM) has no
text encoder or tokenizer: prompt embeddings are passed directly, so nothing is downloaded. It is
saved with `save_pretrained` and loaded back through `load_ldm3d`, as a user's local copy would be.
"""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from g3dr.depth import DEPTH_SPAN, to_g3dr_depth  # noqa: E402
from g3dr.depthio import DEPTH_OFFSET, read_depth_png  # noqa: E402
from g3dr.generate import (LDM3DNotFoundError, generate_rgbd, imagenet_class_prompt, load_ldm3d,  # noqa: E402
                           save_rgbd)

EMB = 8  # cross-attention width of the tiny UNet (CLIP-L's is 768)


@pytest.fixture(scope="module")
def ldm3d_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionLDM3DPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=EMB,
                                norm_num_groups=4, attention_head_dim=2)
    # ldm3d-4c's VAE: 4 channels in and out (RGB + one depth channel)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=4, out_channels=4, latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    pipe = StableDiffusionLDM3DPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                        safety_checker=None, feature_extractor=None, image_encoder=None,
                                        requires_safety_checker=False)
    d = tmp_path_factory.mktemp("ldm3d")
    pipe.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipe(ldm3d_dir):
    return load_ldm3d(ldm3d_dir, device="cpu", progress=False)


def test_load_ldm3d_defaults(pipe):
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"  # float32 on cpu
    assert pipe.vae.config.out_channels == 4


def test_generate_rgbd_shapes_ranges_and_depth(pipe):
    emb = torch.randn(1, 4, EMB, generator=torch.Generator().manual_seed(1))
    rgb, depth = generate_rgbd(pipe, prompt_embeds=emb, height=32, width=24, steps=2, guidance=1.0, seed=3)
    assert rgb.shape == (3, 32, 24) and rgb.dtype == torch.float32
    assert depth.shape == (32, 24) and depth.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0
    assert depth.min() >= DEPTH_OFFSET and depth.max() <= DEPTH_OFFSET + DEPTH_SPAN and depth.std() > 0.1
    # the same call through the pipeline itself: rgb is its RGB output, depth its 4th (depth) channel
    # converted as inverse depth (larger LDM3D value = nearer = smaller G3DR depth)
    out = pipe(prompt_embeds=emb, height=32, width=24, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(3), output_type="np")
    assert torch.allclose(rgb, torch.from_numpy(out.rgb[0]).permute(2, 0, 1), atol=1e-6)
    ldm = torch.from_numpy(out.depth[0, ..., 0])
    assert torch.allclose(depth, to_g3dr_depth(ldm, "inverse"), atol=1e-5)
    near, far = ldm.argmax(), ldm.argmin()
    assert depth.flatten()[near] < depth.flatten()[far]
    # (equal outputs from two separate runs with seed 3 also show that the seed is used)


def test_generate_rgbd_guidance_with_negative_embeds(pipe):
    emb = torch.randn(1, 4, EMB)
    rgb, depth = generate_rgbd(pipe, prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb),
                               height=16, width=16, steps=1, guidance=4.0, seed=0)
    assert rgb.shape == (3, 16, 16) and depth.shape == (16, 16) and torch.isfinite(depth).all()
    with pytest.raises(ValueError, match="negative_prompt_embeds"):  # no tokenizer to make the empty prompt
        generate_rgbd(pipe, prompt_embeds=emb, height=16, width=16, steps=1, guidance=4.0)


class _FakeLDM3D:
    """Returns a fixed RGB-D in the pipeline's np format; LDM3D depth rises left (far) to right (near)."""
    vae_scale_factor = 8
    vae = SimpleNamespace(config=SimpleNamespace(out_channels=4))
    tokenizer = text_encoder = object()

    def __call__(self, **kw):
        self.kw = kw
        h, w = kw["height"], kw["width"]
        ldm_depth = np.tile(np.linspace(0.1, 0.9, w, dtype=np.float32), (h, 1))[None, ..., None]  # [1,H,W,1]
        return SimpleNamespace(rgb=np.full((1, h, w, 3), 0.25, np.float32), depth=ldm_depth)


def test_depth_convention_and_class_prompt():
    fake = _FakeLDM3D()
    rgb, depth = generate_rgbd(fake, class_id=207, height=16, width=32, steps=3, guidance=2.0, seed=1)
    assert fake.kw["prompt"] == "a photo of a golden retriever"
    assert fake.kw["num_inference_steps"] == 3 and fake.kw["guidance_scale"] == 2.0
    assert torch.allclose(rgb, torch.full((3, 16, 32), 0.25))
    row = depth[5]
    assert torch.all(row[1:] <= row[:-1]) and row[0] > row[-1] + 1.5  # larger LDM3D value = nearer
    assert torch.allclose(depth[0], depth[-1])
    _, as_depth = generate_rgbd(fake, prompt="x", height=16, width=32, depth_kind="depth")
    assert as_depth[5, 0] < as_depth[5, -1]  # the override flips it


def test_generate_rgbd_bad_arguments(pipe):
    emb = torch.randn(1, 4, EMB)
    with pytest.raises(ValueError, match="exactly one"):
        generate_rgbd(pipe)
    with pytest.raises(ValueError, match="exactly one"):
        generate_rgbd(pipe, prompt="a cat", class_id=3)
    with pytest.raises(ValueError, match="multiple of 2"):
        generate_rgbd(pipe, prompt_embeds=emb, height=15, width=16, guidance=1.0)
    with pytest.raises(ValueError, match="steps"):
        generate_rgbd(pipe, prompt_embeds=emb, steps=0, guidance=1.0)
    with pytest.raises(ValueError, match=r"\[1, T, E\]"):
        generate_rgbd(pipe, prompt_embeds=torch.randn(4, EMB))
    with pytest.raises(ValueError, match="depth_kind"):
        generate_rgbd(pipe, prompt_embeds=emb, depth_kind="disparity")
    six = _FakeLDM3D()
    six.vae = SimpleNamespace(config=SimpleNamespace(out_channels=6))  # the original 6-channel ldm3d
    with pytest.raises(ValueError, match="6 channels"):
        generate_rgbd(six, prompt="x")


def test_imagenet_class_prompt():
    assert imagenet_class_prompt(0) == "a photo of a tench"
    assert imagenet_class_prompt(np.int64(207), "{}") == "golden retriever"
    with pytest.raises(ValueError, match="999"):
        imagenet_class_prompt(1000)
    with pytest.raises(ValueError, match="999"):
        imagenet_class_prompt(-1)
    for bad in ("3", 2.0, True):
        with pytest.raises(TypeError, match="int"):
            imagenet_class_prompt(bad)


def test_save_rgbd_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 12, 20, generator=g)
    depth = DEPTH_OFFSET + 2 * torch.rand(12, 20, generator=g) * 0.999
    rgb_path, depth_path = save_rgbd(tmp_path / "train", "cat_001", rgb, depth)
    assert rgb_path == tmp_path / "train" / "cat_001.png" and depth_path == tmp_path / "train" / "cat_001_depth.png"
    back = torch.from_numpy(np.asarray(Image.open(rgb_path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    assert (back - rgb).abs().max() <= 0.5 / 255 + 1e-6
    assert (read_depth_png(depth_path) - depth).abs().max() <= 1.0 / 65536 + 1e-6
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["cat_001.png", "cat_001_depth.png"]


def test_save_rgbd_bad_input(tmp_path):
    rgb, depth = torch.rand(3, 8, 8), torch.full((8, 8), 5.0)
    for name in ("../escape", "a/b", "", "x_depth", ".hidden"):
        with pytest.raises(ValueError, match="name"):
            save_rgbd(tmp_path, name, rgb, depth)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        save_rgbd(tmp_path, "a", rgb[:2], depth)
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        save_rgbd(tmp_path, "a", rgb, depth[:4])
    with pytest.raises(TypeError, match="tensors"):
        save_rgbd(tmp_path, "a", rgb.numpy(), depth)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot create"):
        save_rgbd(blocker / "out", "a", rgb, depth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_missing_weights_error(tmp_path, ldm3d_dir):
    missing = tmp_path / "models" / "ldm3d-4c"
    with pytest.raises(LDM3DNotFoundError) as e:
        load_ldm3d(missing)
    for part in (str(missing), "Intel/ldm3d-4c", "huggingface-cli download", "model_index.json", "missing"):
        assert part in str(e.value)
    partial = tmp_path / "partial"
    shutil.copytree(ldm3d_dir, partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(LDM3DNotFoundError, match=r"incomplete \(missing: unet/\)"):
        load_ldm3d(partial)
    (partial / "model_index.json").unlink()
    with pytest.raises(LDM3DNotFoundError, match=r"missing: model_index.json"):
        load_ldm3d(partial)


def test_generate_to_3d_end_to_end(pipe, ldm3d_dir, tmp_path, capsys):
    """The `g3dr generate` path: tiny LDM3D (prompt embeddings given: no tokenizer) -> RGB-D -> tiny G3DR ->
    views, video, planes and a mesh; the CLI's argument errors."""
    import warnings
    from g3dr.cli import main
    from g3dr.config import apply_overrides, preset
    from g3dr.infer import generate_to_3d
    from g3dr.train import train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(apply_overrides(preset("tiny"), ["train.steps=1"]), tmp_path / "run", progress=False)
    emb = torch.randn(1, 4, EMB, generator=torch.Generator().manual_seed(0))
    res = generate_to_3d(ldm3d_dir, tmp_path / "run", tmp_path / "out", prompt_embeds=emb, pipe=pipe, steps=2,
                         guidance=1.0, seed=0, size=32, n_frames=2, n_coarse=4, n_fine=4, device="cpu",
                         progress=False)
    assert read_depth_png(res["depth"]).shape == (32, 32)
    assert (tmp_path / "out" / "generated" / "planes.safetensors").is_file() and res["gif"].endswith("video.gif")
    with pytest.raises(SystemExit):
        main(["generate", "--ldm3d", str(ldm3d_dir), "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "a cat", "--ldm3d", str(tmp_path / "missing"), "--ckpt", str(tmp_path / "run"),
              "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "ldm3d-4c" in capsys.readouterr().err
