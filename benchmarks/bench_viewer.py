"""Viewer timings and README screenshots.

- The single-file HTML viewer in headless Chromium (WebGL2 on SwiftShader, i.e. on the CPU, unless the
  browser finds a GPU): time of the full-size pass for one camera (`drawMs`), and from the camera change
  to `window.g3drReady` with the coarse passes before it (`totalMs`).
- The live viewer (`g3dr view`): seconds per frame at each resolution step (height max/8 ... max,
  4:3 aspect), the render call the viewer makes for a browser camera (`g3dr.view.render_view`).
Model: the given checkpoint + input, else the `small` preset with a fixed seed and the test suite's
weight scaling (timings depend on sizes and sample counts, not on what the weights learned).

Run:  PYTHONPATH=$PWD python benchmarks/bench_viewer.py [--ckpt RUN --input IMG] [--html-sizes 128 256]
      PYTHONPATH=$PWD python benchmarks/bench_viewer.py --screenshots docs [--ckpt RUN --input IMG]
      (the README pictures; default: the built-in planet scene)
Results: appended to benchmarks/results/viewer.jsonl; benchmarks/results/viewer.md is rewritten.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import commit, machine  # noqa: E402
from g3dr.browser import Browser  # noqa: E402
from g3dr.cameras import CANONICAL_PITCH, CANONICAL_YAW  # noqa: E402
from g3dr.config import preset  # noqa: E402
from g3dr.model import G3DR  # noqa: E402
from g3dr.webgl import export_html  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def scaled_model(name: str = "small") -> G3DR:
    """A preset with a fixed seed, U-Net output x4 and decoder x3 (as tests/test_viewer.py): views not flat."""
    torch.manual_seed(0)
    model = G3DR(preset(name)).eval()
    with torch.no_grad():
        model.generator.final_conv.weight.mul_(4)
        model.decoder.weight1.mul_(3)
        model.decoder.weight2.mul_(3)
    return model


def planet():
    """The built-in closed-form scene (g3dr.scene: banded planet with a ring) as a tiny-preset model
    (its decoder dims match: C=8, hidden 16) and planes [1,3,8,96,96]."""
    from g3dr.scene import demo_decoder, demo_planes
    model = G3DR(preset("tiny")).eval()
    model.decoder.load_state_dict(demo_decoder(8, 16, 3).state_dict())
    return model, demo_planes(96, 8)


def model_and_planes(a):
    if a.ckpt:
        from g3dr.infer import load, planes_for
        model = load(a.ckpt, "cpu")
        return model, planes_for(model, a.input), f"{Path(a.ckpt).name}"
    from g3dr.synthetic import canonical_rgbd
    model = scaled_model(a.preset)
    img, dep = canonical_rgbd(5, resolution=model.cfg.model.image_size)
    return model, model.reconstruct(img, dep), f"{a.preset} (seeded, scaled)"


def html_times(model, planes, sizes, tmp: Path):
    path = tmp / "scene.html"
    export_html(model, planes, path, measure=False)
    rows = []
    with Browser(640, 480) as b:
        b.open(path.as_uri() + f"#size={sizes[0]}")
        b.wait("window.g3drReady === true || window.g3drError !== null", 3600, poll=0.5)
        gpu = b.eval("(() => { const gl = document.createElement('canvas').getContext('webgl2'); "
                     "const e = gl.getExtension('WEBGL_debug_renderer_info'); "
                     "return e ? gl.getParameter(e.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER); })()")
        version = b.call("Browser.getVersion")["product"]
        for size in sizes:
            b.eval(f"window.g3drReady = false; location.hash = '#yaw={CANONICAL_YAW + 0.3}&pitch={CANONICAL_PITCH}"
                   f"&size={size}'; true")
            b.wait("window.g3drReady === true || window.g3drError !== null", 3600, poll=0.5)
            if b.eval("window.g3drError"):
                raise RuntimeError(b.eval("window.g3drError"))
            s = b.eval("window.g3drStats")
            rows.append({"size": size, "draw_s": s["drawMs"] / 1e3, "total_s": s["totalMs"] / 1e3,
                         "samples": f"{s['nc']}+{s['nf']}", "browser": version, "webgl": gpu})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def live_times(model, planes, max_height: int, repeats: int):
    from g3dr.view import STEPS, render_view
    from g3dr_kernels.cameras import g3dr_cam2world
    c2w = g3dr_cam2world(CANONICAL_YAW + 0.3, CANONICAL_PITCH, model.cfg.render.radius)[0]
    fov = math.radians(model.cfg.render.fov)
    rows = []
    for div in STEPS:
        h = max(8, max_height // div)
        w = round(h * 4 / 3)
        render_view(model, planes, c2w, fov, w, h)  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            render_view(model, planes, c2w, fov, w, h)
            ts.append(time.perf_counter() - t0)
        r = model.cfg.render
        rows.append({"step": f"1/{div}", "width": w, "height": h, "s_per_frame": statistics.median(ts),
                     "samples": f"{r.n_coarse}+{r.n_fine}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def screenshots(out: Path, tmp: Path, model=None, planes=None) -> None:
    """out/viewer_html.png and out/viewer_live.png: of the given model and planes, else of the built-in
    planet scene (32+32 samples)."""
    from PIL import Image

    from g3dr.view import LiveViewer
    ns = {} if model is not None else {"n_coarse": 32, "n_fine": 32}
    if model is None:
        model, planes = planet()
    out.mkdir(parents=True, exist_ok=True)
    html = tmp / "scene.html"
    export_html(model, planes, html, title="g3dr", **ns)
    with Browser(420, 350) as b:
        b.open(html.as_uri() + "#yaw=1.9&pitch=1.25&size=256")
        b.wait("window.g3drReady === true || window.g3drError !== null", 3600, poll=0.5)
        Image.fromarray(b.screenshot()).save(out / "viewer_html.png", optimize=True)
    from g3dr.infer import save_planes
    pt = save_planes(tmp / "planes.safetensors", planes.cpu(), model.cfg)
    viewer = LiveViewer(model, [pt], port=0, out=tmp / "view", max_height=256, verbose=False, **ns)
    url = viewer.start()
    yaw, pitch, r = 1.9, 1.25, model.cfg.render.radius  # the 3DGP spherical convention, as in the HTML shot
    viewer.server.initial_camera.position = (r * math.sin(pitch) * math.sin(-yaw), r * math.cos(pitch),
                                             r * math.sin(pitch) * math.cos(yaw))
    try:
        with Browser(1000, 560) as b:
            b.open(url)
            t0 = time.monotonic()
            while not any(f["height"] == 256 for f in viewer.frames) and time.monotonic() - t0 < 600:
                time.sleep(0.5)
            b.eval("document.querySelectorAll('.mantine-Notification-root button, [class*=Notification] button')"
                   ".forEach(x => x.click()); true")
            time.sleep(2)
            Image.fromarray(b.screenshot()).save(out / "viewer_live.png", optimize=True)
    finally:
        viewer.stop()
    print(f"wrote {out / 'viewer_html.png'}, {out / 'viewer_live.png'}")


def write_md(allrows) -> None:
    lines = ["# Viewers: frame times", "",
             "Generated by benchmarks/bench_viewer.py. **HTML viewer**: the single-file WebGL2 page in headless "
             "Chromium; `webgl` names the device that ran the shader (SwiftShader = software WebGL on the CPU, "
             "no GPU). `draw` is the full-size pass for one camera, `total` the time from the camera change to "
             "`window.g3drReady`, with the coarse 1/8, 1/4, 1/2 passes drawn first. **Live viewer**: seconds per "
             "frame of `g3dr.view.render_view` (our kernels, the model's sample counts) at each resolution "
             "step of `g3dr view`, 4:3 aspect; image encoding and transfer not included. No GPU row yet: the script has "
             "only run on a CPU machine.", "",
             "## HTML viewer", "",
             "| date | commit | machine | model | size | samples | draw s | total s | webgl | browser | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['date'][:10]} | {r['commit'][:7]} | {r['machine']} | {r['model']} | {r['size']}\u00b2 | "
              f"{r['samples']} | {r['draw_s']:.1f} | {r['total_s']:.1f} | {r['webgl']} | {r['browser']} | {r['note']} |"
              for r in allrows if r["bench"] == "html"]
    lines += ["", "## Live viewer (`g3dr view`)", "",
              "| date | commit | machine | model | step | frame | samples | s/frame | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['date'][:10]} | {r['commit'][:7]} | {r['machine']} | {r['model']} | {r['step']} | "
              f"{r['width']}x{r['height']} | {r['samples']} | {r['s_per_frame']:.3f} | {r['note']} |"
              for r in allrows if r["bench"] == "live"]
    (RESULTS / "viewer.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="a checkpoint (default: the seeded, scaled preset)")
    p.add_argument("--input", default=None, help="with --ckpt: an image (+ depth) or planes.pt")
    p.add_argument("--preset", default="small")
    p.add_argument("--html-sizes", type=int, nargs="*", default=[256])
    p.add_argument("--live-height", type=int, default=256, help="the live viewer's maximum height")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--screenshots", default=None, help="write the README screenshots to this folder and stop")
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    if bool(a.ckpt) != bool(a.input):
        p.error("give --ckpt and --input together")
    with tempfile.TemporaryDirectory() as tmp:
        if a.screenshots:
            mp = model_and_planes(a)[:2] if a.ckpt else (None, None)
            screenshots(Path(a.screenshots), Path(tmp), *mp)
            return
        model, planes, name = model_and_planes(a)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        base = dict(model=name, machine=machine(), commit=commit(), date=stamp, note=a.note)
        rows = [{"bench": "live", **base, **r} for r in live_times(model, planes, a.live_height, a.repeats)]
        if a.html_sizes:
            rows += [{"bench": "html", **base, **r} for r in html_times(model, planes, a.html_sizes, Path(tmp))]
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "viewer.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    write_md([json.loads(line) for line in open(RESULTS / "viewer.jsonl")])


if __name__ == "__main__":
    main()
