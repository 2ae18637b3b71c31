"""The two viewers, checked in a real browser (headless Chromium, WebGL2 on SwiftShader):

- the single-file HTML viewer (`g3dr export --out scene.html`) against `g3dr render` of the same
  three views with the same sample counts: PSNR per view, and a constant image (the best one, the
  view's mean colour) scoring far below, so the check can fail;
- the live viewer (`g3dr view`, viser): a server on a free loopback port, the page loaded, a frame
  that is the rendered image (not a blank page) within 60 s, the server stopped.

A `tiny` model with a fixed seed, its U-Net output and decoder weights scaled up so its views are
far from flat. Without Chromium the browser tests skip and name the install command.
"""
import base64
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.checkpoint import save_model
from g3dr.browser import INSTALL_HINT, Browser, find_chromium
from g3dr.cli import main
from g3dr.config import preset
from g3dr.depthio import write_depth_png
from g3dr.infer import load, trajectory
from g3dr.model import G3DR
from g3dr.synthetic import canonical_rgbd
from g3dr_kernels import reference

HAS_WS = importlib.util.find_spec("websockets") is not None
HAS_VISER = importlib.util.find_spec("viser") is not None
needs_browser = pytest.mark.skipif(find_chromium() is None or not HAS_WS,
                                   reason=f"needs Chromium ({INSTALL_HINT}) and websockets (pip install 'g3dr[view]')")
needs_viser = pytest.mark.skipif(not HAS_VISER, reason="needs viser: pip install 'g3dr[view]'")

SIZE = 48                                    # canvas / render size: small, SwiftShader is slow
OFFSETS = "0:0,0.4:-0.2,-0.6:0.25"           # three views, yaw:pitch offsets from the canonical camera
# Both sides are 8-bit PNGs of the same float math (GLSL float32 vs the C++ kernels), so they differ
# by rounding flips of one level (1/255: 48 dB if every pixel flipped) plus the float16 planes
# (measured by the export, ~80 dB here). 45 dB is what "the same renderer" must reach; the issue's
# bar is 30 dB, which skipping the importance pass (nf=0 below) nearly passes on its own.
PSNR_MIN, PSNR_SAME = 30.0, 45.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()) / 255 ** 2
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A tiny checkpoint whose views are not flat, and one input picture (+ depth) for it."""
    d = tmp_path_factory.mktemp("viewer")
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = G3DR(cfg)
    with torch.no_grad():  # random init renders a near-uniform haze: scale it into a contrasty scene
        model.generator.final_conv.weight.mul_(4)
        model.decoder.weight1.mul_(3)
        model.decoder.weight2.mul_(3)
    save_model(model, cfg, d / "model.safetensors")
    for i in range(2):
        img, dep = canonical_rgbd(5 + i, resolution=cfg.model.image_size)
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(d / f"pic{i}.png")
        write_depth_png(d / f"pic{i}_depth.png", dep[0])
    return d


@pytest.fixture(scope="module")
def browser():
    with Browser(640, 480) as b:
        yield b


def _payload(html: str) -> dict:
    m = re.search(r'<script id="g3dr-scene" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_html_is_one_offline_file_with_the_models_planes(scene, tmp_path, capsys):
    out = tmp_path / "scene.html"
    main(["export", "--ckpt", str(scene / "model.safetensors"), "--input", str(scene / "pic0.png"), "--out", str(out),
          "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "float16" in printed and "dB" in printed
    html = out.read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html), "the page must not load anything"
    assert "fetch(" not in html and "XMLHttpRequest" not in html
    p = _payload(html)
    model = load(scene / "model.safetensors", device="cpu")
    r = model.cfg.render
    assert (p["render"]["n_coarse"], p["render"]["n_fine"], p["render"]["levels"]) == (r.n_coarse, r.n_fine, r.levels)
    # the embedded pyramid is the renderer's own, rounded to float16
    from g3dr.infer import planes_for
    pyr = reference.build_pyramid(planes_for(model, scene / "pic0.png"), r.levels)
    C, c4 = p["planes"]["channels"], p["planes"]["c4"]
    data = np.frombuffer(base64.b64decode(p["planes"]["data"]), "<f2").astype(np.float32)
    off = 0
    for lv, (w, h) in zip(pyr, p["planes"]["levels"]):
        n = 3 * c4 * h * w * 4
        got = torch.from_numpy(data[off:off + n].reshape(3, c4, h, w, 4)).permute(0, 1, 4, 2, 3).reshape(3, -1, h, w)
        torch.testing.assert_close(got[:, :C], lv[0].half().float(), rtol=0, atol=0)
        off += n
    assert off == data.size
    assert p["float16"]["psnr_fp16"] > 50  # float16 planes cost little next to the 8-bit output


def test_html_size_for_the_small_preset(tmp_path):
    from g3dr.webgl import export_html
    cfg = preset("small")
    torch.manual_seed(0)
    model = G3DR(cfg).eval()
    s, C = cfg.model.image_size, cfg.model.plane_channels
    info = export_html(model, torch.randn(1, 3, C, s, s), tmp_path / "small.html", measure=False)
    assert info["bytes"] <= 20e6, info
    with pytest.raises(ValueError, match="unknown viewer format"):
        export_html(model, torch.randn(1, 3, C, s, s), tmp_path / "small.htm.txt", measure=False)


@needs_browser
def test_html_matches_g3dr_render_in_chromium(scene, tmp_path, browser):
    html = tmp_path / "scene.html"
    main(["export", "--ckpt", str(scene / "model.safetensors"), "--input", str(scene / "pic0.png"), "--out", str(html),
          "--device", "cpu"])
    n = preset("tiny").render
    main(["render", "--ckpt", str(scene / "model.safetensors"), "--input", str(scene / "pic0.png"), "--out", str(tmp_path / "r"),
          "--trajectory", OFFSETS, "--resolution", str(SIZE), "--n-coarse", str(n.n_coarse), "--n-fine", str(n.n_fine),
          "--device", "cpu"])
    yaw, pitch = trajectory(OFFSETS, 0)
    browser.open(html.as_uri() + f"#yaw={float(yaw[0])!r}&pitch={float(pitch[0])!r}&size={SIZE}")
    for i in range(len(yaw)):
        want = np.asarray(Image.open(tmp_path / "r" / "pic0" / "rgb" / f"{i:03d}.png").convert("RGB"))
        got = _draw(browser, f"yaw={float(yaw[i])!r}&pitch={float(pitch[i])!r}&size={SIZE}")
        assert got.shape == want.shape == (SIZE, SIZE, 3)
        flat = np.broadcast_to(want.reshape(-1, 3).mean(0), want.shape)  # the best constant image
        print(f"view {i}: HTML {psnr(got, want):.1f} dB, constant {psnr(flat, want):.1f} dB")
        assert psnr(got, want) >= PSNR_MIN and psnr(got, want) >= PSNR_SAME, f"view {i}: {psnr(got, want):.1f} dB"
        assert psnr(flat, want) < 20, "the view is too flat to test anything"
    # the check can fail: the same view without the importance pass misses the exactness bar
    coarse_only = _draw(browser, f"yaw={float(yaw[2])!r}&pitch={float(pitch[2])!r}&size={SIZE}&nf=0")
    assert psnr(coarse_only, want) < PSNR_SAME
    stats = browser.eval("window.g3drStats")
    assert stats["size"] == SIZE and stats["nf"] == 0 and browser.eval("document.querySelector('canvas').width") == SIZE


def _draw(browser, fragment: str, timeout: float = 300) -> np.ndarray:
    browser.eval(f"window.g3drReady = false; location.hash = {json.dumps('#' + fragment)}; true")
    browser.wait("window.g3drReady === true || window.g3drError !== null", timeout)
    assert browser.eval("window.g3drError") is None, browser.eval("window.g3drError")
    return browser.canvas_png()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@needs_viser
@needs_browser
def test_live_viewer_serves_a_frame_and_stops(scene, tmp_path, browser):
    from g3dr.view import LiveViewer
    model = load(scene / "model.safetensors", device="cpu")
    viewer = LiveViewer(model, [scene / "pic0.png", scene / "pic1.png"], port=0, out=tmp_path / "out", max_height=64,
                        verbose=False)
    url = viewer.start()
    port = viewer.server.get_port()
    try:
        assert url.startswith("http://127.0.0.1:") and _port_open(port)
        browser.open(url)
        browser.wait("document.querySelector('canvas') !== null", 60)
        deadline = 60.0
        t0 = time.monotonic()
        while not any(f["height"] == 64 for f in viewer.frames):
            assert time.monotonic() - t0 < deadline, f"no full-size frame within {deadline:.0f} s: {viewer.frames}"
            time.sleep(0.2)
        assert [f["height"] for f in viewer.frames][:1] == [8]  # coarse first
        time.sleep(1.0)  # the browser draws the last frame it got
        shot = browser.screenshot().astype(np.float64).mean(-1)
        state = next(iter(viewer._clients.values()))
        frame = np.asarray(Image.fromarray(state.last[0]).resize(shot.shape[::-1], Image.BILINEAR)).astype(np.float64)
        frame = frame.mean(-1)
        region = (slice(150, 420), slice(0, 290))  # left of the panel, below the notifications
        a, b = shot[region].ravel(), frame[region].ravel()
        assert a.std() > 10, "blank page"
        corr = np.corrcoef(a, b)[0, 1]
        print(f"live viewer: screenshot vs rendered frame correlation {corr:.3f}")
        assert corr > 0.8, "the page does not show the rendered frame"
        # the panel's controls re-render: depth mode gives another picture
        n, rgb = len(viewer.frames), state.last[0]
        viewer._gui["mode"].value = "depth"
        t0 = time.monotonic()
        while not any(f["height"] == 64 for f in viewer.frames[n:]):
            assert time.monotonic() - t0 < deadline
            time.sleep(0.2)
        assert state.last[1]["mode"] == "depth" and psnr(state.last[0], rgb) < 20
        viewer._export(None, "html")
        assert len(list((tmp_path / "out").glob("pic0_*.html"))) == 1
    finally:
        viewer.stop()
    assert not _port_open(port), "server still listening after stop()"
    assert all(not w.thread.is_alive() for w in viewer._workers)


@needs_viser
def test_viser_camera_matches_g3dr_camera():
    import viser.transforms as vtf

    from g3dr.view import pinhole_rays, viser_c2w
    from g3dr_kernels.cameras import g3dr_cam2world
    c2w = g3dr_cam2world(torch.tensor([1.9]), torch.tensor([1.3]), 5.0, dtype=torch.float64)[0]
    cv = c2w[:3, :3] @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))  # OpenGL -> OpenCV axes
    wxyz = vtf.SO3.from_matrix(cv.numpy()).wxyz
    torch.testing.assert_close(viser_c2w(wxyz, c2w[:3, 3].numpy()), c2w)
    o, d = pinhole_rays(c2w, math.radians(18), 5, 3)  # centre pixel looks at the origin
    torch.testing.assert_close(d[0, 7], -c2w[:3, 3] / 5.0)


@needs_viser
def test_view_cli_prints_the_url_and_stops_on_ctrl_c(scene, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "g3dr", "view", "--ckpt", str(scene / "model.safetensors"), "--input",
                             str(scene / "pic0.png"), "--input", str(scene / "pic1.png"), "--port", "0", "--device",
                             "cpu", "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"2 input\(s\) at (http://127\.0\.0\.1:(\d+))", line)
            if m:
                break
        assert m, "".join(lines)
        port = int(m.group(2))
        assert _port_open(port)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopping" in out and not _port_open(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
