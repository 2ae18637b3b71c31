"""`g3dr view`: a live browser viewer on viser (pip install 'g3dr[view]'). The browser orbits and
zooms; every camera move is rendered here with our kernels (the still renderer of `G3DR.render`: its
'uniform' sampling in eval mode) at the browser camera's pose, field of view and aspect, and sent back
as the scene background. Resolution steps 1/8, 1/4, 1/2, 1 of the chosen height: a move restarts at
the coarsest step (cheap while dragging), and the picture sharpens once the camera rests.

    viewer = LiveViewer(model, ["a.png", "b.png"], port=8080)   # binds 127.0.0.1 by default
    print(viewer.start())                                       # the URL
    ...
    viewer.stop()

The panel: input (several per session), RGB / depth / opacity, sigma scale (the density multiplier
of `G3DR.render`), maximum resolution, samples, and buttons that save the current view as PNG and
export the mesh (.glb) and the single-file HTML viewer; files go to the output folder and to the
browser as downloads.
"""
from __future__ import annotations

import io
import math
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cameras import CANONICAL_PITCH, CANONICAL_YAW
from .export import colorize_depth, extract_mesh, save_mesh
from .files import atomic_write
from .infer import list_inputs, load, planes_for
from .webgl import export_html

STEPS = (8, 4, 2, 1)       # divisors of the maximum height, coarse to fine
MODES = ("RGB", "depth", "opacity")
_CHUNK = 4096              # rays per renderer call: a camera move interrupts a frame within one chunk


def _viser():
    try:
        import viser  # optional: only `g3dr view` needs it
    except ImportError as e:
        raise ImportError(f"g3dr view needs viser: pip install 'g3dr[view]' ({e})") from e
    return viser


def pinhole_rays(c2w: torch.Tensor, fov_y: float, width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres of a pinhole camera (three.js / viser convention): c2w [4,4] in the
    OpenGL frame (x right, y up, looks down -z), vertical field of view fov_y (radians) -> rays_o,
    rays_d [1, H*W, 3], row-major from the image top, unit directions."""
    t = math.tan(fov_y / 2)
    ys = (1 - 2 * (torch.arange(height, dtype=c2w.dtype) + 0.5) / height) * t
    xs = (2 * (torch.arange(width, dtype=c2w.dtype) + 0.5) / width - 1) * t * width / height
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    d = F.normalize(torch.stack([x, y, -torch.ones_like(x)], -1).reshape(1, -1, 3), dim=-1)
    d = F.normalize(d @ c2w[:3, :3].T.to(d), dim=-1)
    return c2w[:3, 3].to(d).expand_as(d).contiguous(), d.contiguous()


def viser_c2w(wxyz: Sequence[float], position: Sequence[float]) -> torch.Tensor:
    """viser's camera (quaternion wxyz and position of an OpenCV camera: x right, y down, z forward)
    -> camera-to-world [4,4] in G3DR's OpenGL frame."""
    w, x, y, z = (float(v) for v in wxyz)
    R = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = R @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    c2w[:3, 3] = torch.tensor([float(v) for v in position], dtype=torch.float64)
    return c2w


class Cancelled(Exception):
    pass


@torch.no_grad()
def render_view(model, planes: torch.Tensor, c2w: torch.Tensor, fov_y: float, width: int, height: int, *,
                n_coarse: Optional[int] = None, n_fine: Optional[int] = None, sigma_scale: float = 1.0,
                cancelled=lambda: False) -> Dict[str, torch.Tensor]:
    """One pinhole view with the model's still renderer: -> {"rgb" [H,W,3], "depth" [H,W], "opacity" [H,W]}
    (CPU float32). sigma_scale multiplies the density exactly as `G3DR.render` does (rays slowed down).
    Raises Cancelled between ray chunks when cancelled() turns true."""
    dev = planes.device
    renderer = model.make_renderer(n_coarse, n_fine, sampling="uniform").eval()
    o, d = pinhole_rays(c2w.double(), fov_y, width, height)
    o, d = o.float().to(dev), (d / sigma_scale).float().to(dev)
    parts = []
    for a in range(0, width * height, _CHUNK):
        if cancelled():
            raise Cancelled
        parts.append(renderer(planes, o[:, a:a + _CHUNK], d[:, a:a + _CHUNK]))
    rgb = torch.cat([p.rgb for p in parts], 1)[0].reshape(height, width, 3)
    depth = torch.cat([p.depth for p in parts], 1)[0].reshape(height, width) / sigma_scale
    opacity = torch.cat([p.opacity for p in parts], 1)[0].reshape(height, width)
    return {"rgb": rgb.cpu(), "depth": depth.cpu(), "opacity": opacity.cpu()}


def to_image(view: Dict[str, torch.Tensor], mode: str) -> np.ndarray:
    """A rendered view -> uint8 [H,W,3]: colour, turbo-coloured depth (near warm, pixels with opacity
    <= 0.5 black), or opacity as grey."""
    if mode == "depth":
        return colorize_depth(view["depth"], mask=view["opacity"] > 0.5)
    x = view["rgb"] if mode == "RGB" else view["opacity"][..., None].expand(-1, -1, 3)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class _Client:
    """Render state of one browser tab: a worker thread that renders the latest request, coarse to fine."""

    def __init__(self, viewer: "LiveViewer", client):
        self.viewer, self.client = viewer, client
        self.generation = 0
        self.closed = False                                     # the tab went away: the worker ends
        self.cond = threading.Condition()
        self.last: Optional[Tuple[np.ndarray, Dict]] = None    # latest full-resolution image and its settings
        self.thread = threading.Thread(target=self._run, name=f"g3dr-view-{client.client_id}", daemon=True)
        self.thread.start()

    def request(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify()

    def close(self) -> None:
        self.closed = True
        self.request()

    def _done(self) -> bool:
        return self.closed or self.viewer._stopping.is_set()

    def _run(self) -> None:
        seen = 0
        while True:
            with self.cond:
                while self.generation == seen and not self._done():
                    self.cond.wait(0.5)
                if self._done():
                    return
                seen = self.generation
            try:
                self._render(seen)
            except Cancelled:
                continue
            except Exception as e:  # a failed frame must not kill the tab's worker
                self.viewer._log(f"render failed: {type(e).__name__}: {e}")

    def _render(self, gen: int) -> None:
        v = self.viewer
        cam = self.client.camera
        try:  # before the browser's first camera report (which re-requests) the handle asserts or holds zeros
            if not np.any(cam.wxyz) or not cam.image_height:
                return
            c2w = viser_c2w(cam.wxyz, cam.position)
            fov, aspect = float(cam.fov), float(cam.aspect)
        except AssertionError:
            return
        s = v.settings()
        planes = v.planes(s["input"])
        for div in STEPS:
            h = max(8, s["height"] // div)
            w = max(8, round(h * aspect))
            t0 = time.perf_counter()
            view = render_view(v.model, planes, c2w, fov, w, h, n_coarse=s["n_coarse"], n_fine=s["n_fine"],
                               sigma_scale=s["sigma_scale"], cancelled=lambda: self.generation != gen or self._done())
            ms = (time.perf_counter() - t0) * 1e3
            img = to_image(view, s["mode"])
            if self.generation != gen or self._done():
                raise Cancelled
            self.client.scene.set_background_image(img, format="png" if div == 1 else "jpeg")
            if div == 1:
                self.last = (img, {**s, "c2w": c2w, "fov": fov, "width": w, "height": h})
            v._frame_done(self, w, h, ms)


class LiveViewer:
    """A viser server showing G3DR reconstructions of `inputs`: images (depth beside each as name_depth.png,
    or `depth` for a single input, or estimated with `depth_model_dir`) or planes.pt files of `g3dr render`.
    host defaults to 127.0.0.1 (this machine only); port 0 picks a free one."""

    def __init__(self, model, inputs: Sequence[Union[str, Path]], *, host: str = "127.0.0.1", port: int = 8080,
                 out: Union[str, Path] = "outputs/view", depth=None, depth_model_dir=None, max_height: int = 256,
                 n_coarse: Optional[int] = None, n_fine: Optional[int] = None, verbose: bool = True):
        if not inputs:
            raise ValueError("g3dr view needs at least one input image")
        if depth is not None and len(inputs) != 1:
            raise ValueError("--depth names one depth file; give a single --input image with it")
        self.model, self.inputs = model, [Path(p) for p in inputs]
        self.host, self.port, self.out, self.verbose = host, port, Path(out), verbose
        self._depth, self._depth_model_dir = depth, depth_model_dir
        self._planes: Dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()             # the client tables
        self._planes_lock = threading.Lock()      # one reconstruction at a time
        self._clients: Dict[int, _Client] = {}
        self._workers: List[_Client] = []     # every tab's worker, joined by stop()
        self._stopping = threading.Event()
        self.server = None
        r = model.cfg.render
        self._defaults = {"height": max_height, "n_coarse": n_coarse or r.n_coarse,
                          "n_fine": r.n_fine if n_fine is None else n_fine}
        self.frames: List[Dict] = []    # every frame sent: {"client", "width", "height", "ms"}
        names = [p.name for p in self.inputs]
        self._names = {n if names.count(n) == 1 else str(p): p for n, p in zip(names, self.inputs)}

    # ------------------------------------------------------------------------------ data
    def planes(self, name: str) -> torch.Tensor:
        """The planes of one input (reconstructed once, then cached)."""
        with self._planes_lock:
            if name not in self._planes:
                self._planes[name] = planes_for(self.model, self._names[name], self._depth, self._depth_model_dir)
            return self._planes[name]

    def settings(self) -> Dict:
        g = self._gui
        return {"input": g["input"].value, "mode": g["mode"].value, "sigma_scale": float(g["sigma"].value),
                "height": int(g["height"].value), "n_coarse": int(g["n_coarse"].value),
                "n_fine": int(g["n_fine"].value)}

    # ------------------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.server.get_port()}"

    def start(self) -> str:
        """Start serving (returns at once; rendering happens on worker threads) -> the URL."""
        viser = _viser()
        self.planes(next(iter(self._names)))  # fail early on a bad input, before the server binds
        self.server = server = viser.ViserServer(host=self.host, port=self.port, label="g3dr", verbose=False)
        server.gui.configure_theme(show_share_button=False)  # no public tunnel from the panel: local by default
        server.scene.set_up_direction("+y")
        r = self.model.cfg.render
        eye = (-r.radius * math.sin(CANONICAL_PITCH) * math.sin(CANONICAL_YAW), r.radius * math.cos(CANONICAL_PITCH),
               r.radius * math.sin(CANONICAL_PITCH) * math.cos(CANONICAL_YAW))
        server.initial_camera.position = eye
        server.initial_camera.look_at = (0.0, 0.0, 0.0)
        server.initial_camera.up = (0.0, 1.0, 0.0)
        server.initial_camera.fov = math.radians(r.fov)
        self._build_gui(server)
        server.on_client_connect(self._connect)
        server.on_client_disconnect(self._disconnect)
        return self.url

    def _build_gui(self, server) -> None:
        gui, d = server.gui, self._defaults
        self._gui = {
            "input": gui.add_dropdown("input", tuple(self._names), initial_value=next(iter(self._names))),
            "mode": gui.add_dropdown("show", MODES, initial_value="RGB"),
            "sigma": gui.add_slider("sigma scale", 0.25, 20.0, 0.25, 1.0, hint="multiplies the density field"),
            "height": gui.add_slider("max resolution", 32, 1024, 32, d["height"], hint="height of the sharpest step"),
            "n_coarse": gui.add_slider("coarse samples", 2, 128, 1, d["n_coarse"]),
            "n_fine": gui.add_slider("importance samples", 0, 128, 1, d["n_fine"]),
        }
        for handle in self._gui.values():
            handle.on_update(lambda _: self._rerender_all())
        self._status = gui.add_markdown("waiting for a browser")
        gui.add_button("reset view").on_click(lambda e: self._reset_view(e.client))
        gui.add_button("save PNG").on_click(lambda e: self._save_png(e.client))
        gui.add_button("export mesh (.glb)").on_click(lambda e: self._export(e.client, "glb"))
        gui.add_button("export HTML viewer").on_click(lambda e: self._export(e.client, "html"))

    def _connect(self, client) -> None:
        state = _Client(self, client)
        with self._lock:
            self._clients[client.client_id] = state
            self._workers.append(state)
        client.camera.on_update(lambda _: state.request())
        state.request()

    def _disconnect(self, client) -> None:
        with self._lock:
            state = self._clients.pop(client.client_id, None)
        if state is not None:
            state.close()

    def _rerender_all(self) -> None:
        with self._lock:
            states = list(self._clients.values())
        for s in states:
            s.request()

    def _frame_done(self, state: _Client, w: int, h: int, ms: float) -> None:
        self.frames.append({"client": state.client.client_id, "width": w, "height": h, "ms": ms})
        self._status.content = f"last frame {w}x{h} in {ms / 1e3:.2f} s"

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"g3dr view: {msg}", flush=True)

    # ------------------------------------------------------------------------------ buttons
    def _reset_view(self, client) -> None:
        if client is None:
            return
        init = self.server.initial_camera
        client.camera.position, client.camera.look_at = init.position, init.look_at
        client.camera.up_direction = (0.0, 1.0, 0.0)

    def _stem(self, kind: str) -> str:
        name = Path(self._gui["input"].value).stem
        return f"{name}_{time.strftime('%Y%m%d-%H%M%S')}.{kind}"

    def _deliver(self, client, path: Path) -> None:
        self._log(f"wrote {path}")
        if client is not None:
            client.send_file_download(path.name, path.read_bytes())
            client.add_notification("saved", str(path), auto_close_seconds=5.0)

    def _save_png(self, client) -> None:
        state = self._clients.get(client.client_id) if client is not None else None
        if state is None or state.last is None:
            if client is not None:
                client.add_notification("nothing yet", "wait for the full-resolution frame", auto_close_seconds=3.0)
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / self._stem("png")
        data = _png(state.last[0])
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        self._deliver(client, path)

    def _export(self, client, kind: str) -> None:
        note = client.add_notification("exporting", f"writing the {kind} file...", loading=True) if client else None
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / self._stem(kind)
            planes = self.planes(self._gui["input"].value)
            if kind == "html":
                export_html(self.model, planes, path, title=Path(self._gui["input"].value).stem)
            else:
                r = self.model.cfg.render
                mesh = extract_mesh(planes, self.model.decoder, 128, levels=r.levels, box_warp=r.box_warp,
                                    plane_axes=r.plane_axes, density_bias=r.density_bias)
                save_mesh(mesh, path)
            self._deliver(client, path)
        except Exception as e:
            self._log(f"export failed: {e}")
            if client is not None:
                client.add_notification("export failed", str(e), color="red")
        finally:
            if note is not None:
                note.remove()

    def stop(self) -> None:
        """Stop the workers and the server (idempotent)."""
        self._stopping.set()
        with self._lock:
            states = list(self._workers)
        for s in states:
            s.close()
        for s in states:
            s.thread.join(timeout=30)
        if self.server is not None:
            self.server.stop()
            self.server = None


def serve(ckpt, inputs: Sequence[Union[str, Path]], *, host: str = "127.0.0.1", port: int = 8080,
          out: Union[str, Path] = "outputs/view", depth=None, depth_model_dir=None, max_height: int = 256,
          n_coarse: Optional[int] = None, n_fine: Optional[int] = None, device: Optional[str] = None,
          backend: Optional[str] = None) -> None:
    """`g3dr view`: load the model, serve until Ctrl-C, then stop cleanly."""
    model = load(ckpt, device, backend)
    items = [p for src in inputs for p in list_inputs(src)]
    viewer = LiveViewer(model, items, host=host, port=port, out=out, depth=depth, depth_model_dir=depth_model_dir,
                        max_height=max_height, n_coarse=n_coarse, n_fine=n_fine)
    try:  # from the start: a Ctrl-C that lands while the server starts or the URL prints still stops cleanly
        url = viewer.start()
        print(f"g3dr view: {len(items)} input(s) at {url}  (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ng3dr view: stopping", flush=True)
    finally:
        viewer.stop()
