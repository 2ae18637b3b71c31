"""Headless Chromium through the DevTools protocol (one websocket, no Selenium, no Playwright
download): open a page, wait for a JavaScript condition, read a canvas or a screenshot. Used by the
viewer tests, the viewer benchmark and the README screenshots.

    with Browser() as b:                     # raises BrowserMissing (with the install command) if absent
        b.open("file:///tmp/scene.html#yaw=1.57&pitch=1.57&size=64")
        b.wait("window.g3drReady === true", timeout=60)
        img = b.canvas_png("canvas")         # uint8 [H,W,3]

WebGL2 runs on SwiftShader (software) there: `--use-angle=swiftshader --enable-unsafe-swiftshader`.
Needs `websockets` (pip install 'g3dr[view]') and Debian's chromium (apt-get install -y chromium).
"""
from __future__ import annotations

import atexit
import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Any, Optional
from urllib.request import urlopen

import numpy as np
from PIL import Image

INSTALL_HINT = "apt-get install -y chromium  (Debian/Ubuntu: the system Chromium; or set G3DR_CHROMIUM=/path)"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--ignore-gpu-blocklist", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
         "--disable-backgrounding-occluded-windows", "--hide-scrollbars", "--mute-audio",
         "--remote-allow-origins=*", "--remote-debugging-port=0")


class BrowserMissing(RuntimeError):
    """No Chromium (or no websockets package) on this machine; the message says how to install it."""


def _keep_priority() -> list:
    """A command prefix that keeps Chromium at the caller's CPU priority: run as root it would raise some of
    its threads' priorities (nice 0 and -8 from a `nice -n 19` caller), taking the CPU from other work. Without
    CAP_SYS_NICE (dropped by util-linux's setpriv) those calls fail and every thread stays at our nice value."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return []  # unprivileged processes cannot raise their priority anyway
    return [setpriv, "--bounding-set=-sys_nice", "--inh-caps=-sys_nice", "--"]


def find_chromium() -> Optional[str]:
    """Path of a Chromium/Chrome executable: $G3DR_CHROMIUM, else the first of CANDIDATES on PATH."""
    env = os.environ.get("G3DR_CHROMIUM")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with a fresh profile and one page, driven over the DevTools protocol.
    width/height: the page's viewport in CSS pixels, at devicePixelRatio 1."""

    def __init__(self, width: int = 800, height: int = 600, executable: Optional[str] = None,
                 start_timeout: float = 60.0):
        try:
            from websockets.sync.client import connect  # optional: g3dr[view]
        except ImportError as e:
            raise BrowserMissing(f"the browser driver needs the websockets package: pip install 'g3dr[view]' ({e})")
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserMissing(f"no Chromium found; install it: {INSTALL_HINT}")
        self._profile = tempfile.mkdtemp(prefix="g3dr-chromium-")
        self._proc = subprocess.Popen([*_keep_priority(), exe, *FLAGS, f"--user-data-dir={self._profile}",
                                       f"--window-size={width},{height}", "about:blank"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        atexit.register(self.close)
        self._ws = None
        self._id = 0
        self.console: list = []
        try:
            port = self._devtools_port(start_timeout)
            page = self._page_url(port, start_timeout)
            self._ws = connect(page, max_size=2 ** 28, open_timeout=start_timeout)
            self.call("Runtime.enable")
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------- plumbing
    def _devtools_port(self, timeout: float) -> int:
        """Chromium prints 'DevTools listening on ws://127.0.0.1:PORT/...' on stderr once it is up."""
        deadline = time.monotonic() + timeout
        seen = b""
        os.set_blocking(self._proc.stderr.fileno(), False)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = seen.decode(errors="replace")[-2000:]
                raise RuntimeError(f"chromium exited with {self._proc.returncode}: {tail}")
            chunk = self._proc.stderr.read()
            if chunk:
                seen += chunk
                m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", seen)
                if m:
                    return int(m.group(1))
            time.sleep(0.05)
        raise TimeoutError(f"chromium did not start within {timeout:.0f} s: {seen.decode(errors='replace')[-2000:]}")

    @staticmethod
    def _page_url(port: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("chromium has no page target")

    def call(self, method: str, timeout: float = 120.0, **params) -> dict:
        """Send one DevTools command and wait for its result (events seen meanwhile are dropped,
        console messages kept in self.console)."""
        self._id += 1
        mid = self._id
        self._ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DevTools {method} got no answer within {timeout:.0f} s")
            msg = json.loads(self._ws.recv(timeout=left))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})
            if msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(msg["params"].get("exceptionDetails", {}))[:2000])

    # ------------------------------------------------------------------------------- page API
    def eval(self, expression: str, timeout: float = 120.0) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its JSON value."""
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error in {expression[:80]!r}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def open(self, url: str, timeout: float = 60.0) -> None:
        """Navigate and wait until the document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    def wait(self, condition: str, timeout: float = 60.0, poll: float = 0.1) -> float:
        """Poll a JavaScript condition until it is truthy; returns the seconds waited. TimeoutError
        (with the page's console messages) if it never is."""
        t0 = time.monotonic()
        while True:
            if self.eval(f"!!({condition})"):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{condition!r} still false after {timeout:.0f} s; console: {self.console[-10:]}")
            time.sleep(poll)

    def canvas_png(self, selector: str = "canvas") -> np.ndarray:
        """The backing store of a <canvas> as uint8 [H,W,3] (toDataURL: lossless, no page scaling)."""
        url = self.eval(f"document.querySelector({json.dumps(selector)}).toDataURL('image/png')")
        if not isinstance(url, str) or not url.startswith("data:image/png;base64,"):
            raise RuntimeError(f"no canvas {selector!r} on the page")
        data = base64.b64decode(url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def screenshot(self) -> np.ndarray:
        """The viewport as uint8 [H,W,3]."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    # ------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        atexit.unregister(self.close)
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
            self._ws = None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._proc.stderr:
            self._proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
