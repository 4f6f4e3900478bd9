"""Drive the viewer in a real headless Chromium: the browser tests' tools, and the README's
screenshot.

    python -m cxr_sr.client.viewer.browser --out docs/images/viewer.png

starts a Triton server on ``build/model_repository_cpu`` (``make build``) and the viewer, loads
the bundled radiograph (``RG1_UNCI.dcm`` from pydicom-data) in the native protocol, waits for
its SR, sets the split slider and a zoom, and saves a screenshot (palette PNG, kept under
``--max-kb``).

Needs the ``dev`` extra (selenium) and Debian's ``chromium`` and ``chromium-driver``
(system-packages.txt). The browser is cut off from everything but loopback (a dead proxy and
a host resolver that resolves nothing), as on a closed hospital network; its performance log
lists every request it made (:func:`requested_urls`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from cxr_sr.builders.serve import free_port

WINDOW = (1400, 1000)  # the page's viewport is about 1400 x 860


def http_get(url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body); HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class ViewerProcess:
    """``python -m cxr_sr.client.viewer --url TRITON --port <free> ARGS...`` on 127.0.0.1,
    waited for until its API answers; ``base`` is its URL, ``stop()`` sends Ctrl-C. ``env``
    adds to the environment (e.g. PACS credentials)."""

    def __init__(
        self,
        triton_url: str,
        log: Path,
        *args: str,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/"
        self.log = Path(log)
        cmd = [sys.executable, "-m", "cxr_sr.client.viewer", "--url", triton_url]
        cmd += ["--port", str(self.port), "--log-level", "info", *args]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"viewer exited with {self.process.returncode}: {self.log.read_text()}"
                )
            try:
                if http_get(self.base + "api/status", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"viewer not up after {start_timeout_s:g} s")
            time.sleep(0.2)

    def stop(self) -> int:
        """Ctrl-C (what a user does), then wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ViewerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def offline_chrome(window: tuple[int, int] = WINDOW) -> webdriver.Chrome:
    """Headless Chromium (the system's) that reaches loopback only and logs every request."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        raise RuntimeError(
            "needs Debian's chromium and chromium-driver (system-packages.txt; make system)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={window[0]},{window[1]}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        # offline: loopback bypasses the (dead) proxy, and no host name resolves
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--no-first-run",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    """Every URL the page requested since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def job_state(driver: webdriver.Chrome) -> str | None:
    """The page's last job: uploading, queued, running, done (images shown) or failed."""
    return driver.execute_script("return document.body.dataset.job || null")


def wait_job(driver: webdriver.Chrome, timeout_s: float = 180, on_poll=None) -> str:
    """Wait until the page's job is done or failed (calling ``on_poll(driver)`` as it
    waits); returns which."""

    def ended(d) -> bool:
        if on_poll is not None:
            on_poll(d)
        return job_state(d) in ("done", "failed")

    WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(ended)
    return job_state(driver)


def wait_server_status(driver: webdriver.Chrome, ready: bool, timeout_s: float = 30) -> None:
    """Wait until the page's Triton badge says ready (or not)."""
    want = "true" if ready else "false"
    WebDriverWait(driver, timeout_s).until(
        lambda d: d.find_element(By.ID, "server-status").get_attribute("data-ready") == want
    )


def upload(driver: webdriver.Chrome, path: Path, mode: str) -> None:
    """Pick the mode, choose the file and press the button."""
    driver.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    driver.find_element(By.ID, "file").send_keys(str(Path(path).resolve()))
    driver.find_element(By.ID, "run").click()


def drag_split(driver: webdriver.Chrome, dx: int) -> float:
    """Drag the split slider's handle by ``dx`` CSS pixels; the new split (0..1)."""
    handle = driver.find_element(By.ID, "handle")
    ActionChains(driver).click_and_hold(handle).move_by_offset(dx, 0).release().perform()
    return float(driver.find_element(By.ID, "split").get_attribute("data-split"))


def wheel_zoom(driver: webdriver.Chrome, clicks: int, fx: float = 0.5, fy: float = 0.5) -> None:
    """Turn the wheel ``clicks`` notches (positive: in) over the split view at fraction
    (fx, fy) of its size."""
    canvas = driver.find_element(By.CSS_SELECTOR, "#split canvas")
    rect = canvas.rect
    origin = ScrollOrigin.from_element(
        canvas, int((fx - 0.5) * rect["width"]), int((fy - 0.5) * rect["height"])
    )
    for _ in range(abs(clicks)):
        ActionChains(driver).scroll_from_origin(origin, 0, -100 if clicks > 0 else 100).perform()


def _palette(image: Image.Image, grays: int) -> Image.Image:
    """A 256-entry palette for a screenshot of gray images in a coloured UI: ``grays`` even
    gray levels, the rest the UI's own colours (median cut of its coloured pixels)."""
    rgb = np.asarray(image)
    coloured = (rgb.max(-1).astype(int) - rgb.min(-1)) > 12
    entries = [v for i in range(grays) for v in (round(i * 255 / (grays - 1)),) * 3]
    if coloured.any():
        ui = Image.fromarray(rgb[coloured].reshape(1, -1, 3))
        entries += ui.quantize(256 - grays, method=Image.Quantize.MEDIANCUT).getpalette()
    palette = Image.new("P", (1, 1))
    palette.putpalette((entries + [0] * 768)[:768])
    return palette


def save_small_png(screenshot: bytes, out: Path, max_kb: int) -> int:
    """Write a screenshot as a palette PNG under ``max_kb`` if it can (fewer gray levels
    until it fits); returns its size in bytes."""
    image = Image.open(io.BytesIO(screenshot)).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    for grays in (224, 160, 96, 64):
        image.quantize(palette=_palette(image, grays), dither=Image.Dither.NONE).save(
            out, optimize=True
        )
        if out.stat().st_size <= max_kb * 1024:
            break
    return out.stat().st_size


def _bundled_radiograph() -> Path:
    return Path(get_testdata_file("RG1_UNCI.dcm"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cxr_sr.client.viewer.browser",
        description="Screenshot of the viewer with the bundled radiograph (the README's).",
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("build/model_repository_cpu"),
        help="built repository served when nothing answers at --url (default: %(default)s)",
    )
    p.add_argument("--url", default=None, help="a running Triton's host:port (default: start one)")
    p.add_argument("--image", type=Path, default=None, help="default: the bundled RG1_UNCI.dcm")
    p.add_argument("--mode", choices=("native", "upscale"), default="native", help="job mode")
    p.add_argument("--out", type=Path, default=Path("docs/images/viewer.png"), help="PNG to write")
    p.add_argument("--max-kb", type=int, default=390, help="largest PNG, KB (default: %(default)s)")
    p.add_argument(
        "--zoom", type=int, default=7, help="wheel notches into the image (default: %(default)s)"
    )
    p.add_argument(
        "--left",
        choices=("lr", "bicubic", "sr", "hr"),
        default="lr",
        help="image left of the split slider (default: %(default)s; SR is on the right)",
    )
    p.add_argument(
        "--at",
        default="0.32,0.45",
        help="where to zoom, as fractions x,y of the view (default: %(default)s, a lung field)",
    )
    args = p.parse_args(argv)
    fx, fy = (float(v) for v in args.at.split(","))
    url = args.url or f"127.0.0.1:{free_port()}"
    serve = [] if args.url else ["--serve-repository", str(args.repository)]
    log = args.out.with_suffix(".log")
    t0 = time.perf_counter()
    with ViewerProcess(url, log, *serve) as viewer:
        driver = offline_chrome()
        try:
            driver.get(viewer.base)
            wait_server_status(driver, ready=True, timeout_s=60)
            upload(driver, args.image or _bundled_radiograph(), args.mode)
            state = wait_job(driver, timeout_s=600)
            if state != "done":
                print(driver.find_element(By.ID, "message").text, file=sys.stderr)
                return 1
            seconds = time.perf_counter() - t0
            driver.find_element(By.CSS_SELECTOR, f"#left option[value={args.left}]").click()
            wheel_zoom(driver, args.zoom, fx, fy)
            drag_split(driver, -60)
            time.sleep(0.5)
            size = save_small_png(driver.get_screenshot_as_png(), args.out, args.max_kb)
            outside = [u for u in requested_urls(driver) if not u.startswith(viewer.base)]
        finally:
            driver.quit()
    log.unlink(missing_ok=True)
    print(f"{args.out}: {size / 1024:.0f} KB ({seconds:.0f} s to the SR)")
    if outside:
        print(f"requests that left the viewer: {outside}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
