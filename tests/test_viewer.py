"""The browser viewer (``cxr_sr.client.viewer``) against the real tritonserver, in a real
headless Chromium (Debian's ``chromium`` + ``chromium-driver`` through Selenium).

The viewer runs as its own process (``python -m cxr_sr.client.viewer``) on 127.0.0.1 and a
free port, talking to the session's tiny-model server (LR sides 16-128, so the radiograph is
tiled). The browser is cut off from everything but loopback (a dead proxy and a host
resolver that resolves nothing), as on a closed hospital network, and its performance log is
checked for any request that left 127.0.0.1. Screenshots go to ``outputs/``.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc import PASSWORD, USER, ct_slice, small_radiograph
from PIL import Image
from pydicom.data import get_testdata_file
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from cxr_sr.builders.serve import free_port
from cxr_sr.client.io import read_image
from cxr_sr.client.metrics import psnr, ssim
from cxr_sr.client.triton import SRClient
from cxr_sr.client.viewer import cli
from cxr_sr.client.viewer.browser import (
    ViewerProcess,
    drag_split,
    offline_chrome,
    requested_urls,
    upload,
    wait_job,
    wait_server_status,
    wheel_zoom,
)
from cxr_sr.client.viewer.browser import http_get as _get
from cxr_sr.client.viewer.jobs import FAILED, NATIVE, UPSCALE, Job, run_job
from cxr_sr.imaging import bicubic_baseline, native_pair

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "outputs"
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an identifier in the icon, never fetched


# ----------------------------------------------------------------------------- helpers


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post_refused_early(url: str, size: int) -> tuple[int, dict]:
    """An upload of ``size`` bytes that the viewer refuses from its Content-Length, sent with
    ``Expect: 100-continue``: the answer comes before any of the body is sent. (Sending the
    body anyway races the server's early answer and close: a broken pipe, now and then.)"""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", f"{parts.path}?{parts.query}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _run(viewer: ViewerProcess, data: bytes, timeout_s: float = 120, **query: str) -> dict:
    """Upload ``data`` through the API and wait for the job to end; its summary."""
    status, job = _post(f"{viewer.base}api/jobs?{urllib.parse.urlencode(query)}", data)
    assert status == 202, job
    deadline = time.monotonic() + timeout_s
    while job["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = json.loads(_get(f"{viewer.base}api/jobs/{job['id']}")[2])
    return job


def _pixel(driver: webdriver.Chrome, selector: str, fx: float, fy: float) -> int:
    """Gray value of the canvas in ``selector`` at fraction (fx, fy) of its size."""
    return driver.execute_script(
        "const c = document.querySelector(arguments[0] + ' canvas');"
        "const d = c.getContext('2d').getImageData("
        "  Math.floor(c.width * arguments[1]), Math.floor(c.height * arguments[2]), 1, 1).data;"
        "return d[0];",
        selector,
        fx,
        fy,
    )


def _drawn(driver: webdriver.Chrome) -> None:
    """Wait two animation frames: the page draws (and re-windows) on the next frame."""
    driver.execute_async_script(
        "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done));"
    )


def _column(driver: webdriver.Chrome, selector: str, fx: float) -> list[int]:
    """Gray values down one column of a canvas (every 8th row)."""
    return driver.execute_script(
        "const c = document.querySelector(arguments[0] + ' canvas');"
        "const x = Math.floor(c.width * arguments[1]);"
        "const d = c.getContext('2d').getImageData(x, 0, 1, c.height).data;"
        "const out = []; for (let i = 0; i < c.height; i += 8) out.push(d[4 * i]); return out;",
        selector,
        fx,
    )


def _panel_sizes(driver: webdriver.Chrome) -> dict[str, tuple[int, int, int, int]]:
    """kind -> (stored width, height, displayed width, height) of every panel shown."""
    out = {}
    for el in driver.find_elements(By.CSS_SELECTOR, ".panel"):
        if el.get_attribute("hidden") is None:
            keys = ("width", "height", "display-width", "display-height")
            out[el.get_attribute("data-kind")] = tuple(
                int(el.get_attribute(f"data-{k}")) for k in keys
            )
    return out


# ----------------------------------------------------------------------------- fixtures


def _small_rg1(path: Path, factor: int) -> Path:
    """The bundled radiograph (RG1_UNCI.dcm, 1955x1841 CR) as a DICOM ``factor`` times
    smaller: its stored values area-averaged, every other attribute (MONOCHROME1, the
    window, the UIDs) kept."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    h, w = ds.Rows // factor, ds.Columns // factor
    a = ds.pixel_array[: h * factor, : w * factor].astype(np.float64)
    small = np.rint(a.reshape(h, factor, w, factor).mean(axis=(1, 3))).astype(np.uint16)
    ds.PixelData = small.tobytes()
    ds.Rows, ds.Columns = small.shape
    ds.save_as(path)
    return path


TILE = 72  # the viewer's --tile: the radiograph's LR (122x115) is 4 tiles of 70x67


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory) -> Path:
    """RG1 4x smaller (488x460): in the native protocol, LR 122x115."""
    return _small_rg1(tmp_path_factory.mktemp("viewer") / "rg1_small.dcm", 4)


@pytest.fixture(scope="module")
def viewer(server, tmp_path_factory):
    log = tmp_path_factory.mktemp("viewer_log") / "viewer.log"
    v = ViewerProcess(server.http_url, log, "--tile", str(TILE))
    yield v
    assert v.stop() == 0, v.log.read_text()


@pytest.fixture(scope="module")
def browser():
    driver = offline_chrome()
    yield driver
    driver.quit()


# ----------------------------------------------------------------------------- tests


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_page_and_assets_are_served_locally(viewer):
    """Every asset the page names is served by the viewer, and no file of the page names
    anything elsewhere (http://, https:// or protocol-relative //host URLs)."""
    status, headers, html = _get(viewer.base)
    assert status == 200
    assert "default-src 'self'" in headers["content-security-policy"]
    parser = _Refs()
    parser.feed(html.decode())
    assets = [r for r in parser.refs if not r.startswith("#")]
    assert {"static/viewer.js", "static/viewer.css", "static/favicon.svg"} <= set(assets)
    texts = {"index.html": html.decode()}
    for ref in assets:
        status, _, body = _get(viewer.base + ref)
        assert status == 200, ref
        texts[ref] = body.decode()
    external = re.compile(r"""(https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", re.IGNORECASE)
    for name, text in texts.items():
        found = [m.group(0) for m in external.finditer(text.replace(SVG_NAMESPACE, ""))]
        assert not found, f"{name} references {found}"
    assert "url(" not in texts["static/viewer.css"]  # no fonts or images from a style sheet


def test_browser_compares_lr_bicubic_sr_of_the_radiograph(viewer, browser, radiograph, server):
    """The whole interaction in Chromium: upload the (3x smaller) bundled radiograph as
    DICOM in the native protocol, wait for the tiled SR, check the sizes shown and the
    metrics, move the split slider, change the window, zoom; nothing leaves 127.0.0.1."""
    d = browser
    d.get(viewer.base)
    wait_server_status(d, ready=True)
    upload(d, radiograph, NATIVE)
    stages: set[str] = set()
    state = wait_job(d, on_poll=lambda d: stages.add(d.find_element(By.ID, "stage").text))
    assert state == "done", d.find_element(By.ID, "message").text
    SHOTS.mkdir(exist_ok=True)
    d.save_screenshot(str(SHOTS / "viewer_test_loaded.png"))

    # sizes: HR 488x460, LR 122x115 shown 4x (nearest)
    image = read_image(radiograph)
    hr, lr = native_pair(image)
    sizes = _panel_sizes(d)
    hw = (hr.shape[1], hr.shape[0])
    assert sizes == {
        "lr": (lr.shape[1], lr.shape[0], *hw),
        "bicubic": (*hw, *hw),
        "sr": (*hw, *hw),
        "hr": (*hw, *hw),
    }
    with SRClient(server.http_url) as c:
        assert len(c.tile_plan(*lr.shape, tile=TILE)) == 4  # the radiograph was tiled
        sr = c.upscale(lr, tile=TILE)
    assert any(re.search(r"\d+ / \d+", s) for s in stages), stages  # tile progress shown

    # metrics: the page shows what the protocol gives, computed here independently
    bic = bicubic_baseline(lr)
    shown = {k: float(d.find_element(By.ID, k).text) for k in ("psnr-sr", "psnr-bicubic")}
    assert shown["psnr-bicubic"] == pytest.approx(psnr(bic, hr), abs=0.006)
    assert shown["psnr-sr"] == pytest.approx(psnr(sr, hr), abs=0.006)
    assert float(d.find_element(By.ID, "ssim-sr").text) == pytest.approx(ssim(sr, hr), abs=6e-5)
    delta = float(d.find_element(By.ID, "psnr-delta").text)
    assert delta == pytest.approx(psnr(sr, hr) - psnr(bic, hr), abs=0.006)
    assert "native protocol" in d.find_element(By.ID, "protocol").text

    # split slider: compare LR (nearest) with SR, then drag the handle left
    d.find_element(By.CSS_SELECTOR, "#left option[value=lr]").click()
    _drawn(d)
    before = _column(d, "#split", 0.4)
    assert drag_split(d, -250) < 0.4
    _drawn(d)
    after = _column(d, "#split", 0.4)
    assert before != after  # x = 0.4 now shows the SR instead of the LR
    assert d.find_element(By.ID, "tag-left").text == "LR"

    # window/level: shift-drag on the image, then the width slider from the keyboard
    window = d.execute_script("return document.body.dataset.window")
    centre = _pixel(d, ".panel[data-kind=sr]", 0.5, 0.5)
    canvas = d.find_element(By.CSS_SELECTOR, "#split canvas")
    drag = ActionChains(d).key_down(Keys.SHIFT).click_and_hold(canvas).move_by_offset(-120, 80)
    drag.release().key_up(Keys.SHIFT).perform()
    _drawn(d)
    assert d.execute_script("return document.body.dataset.window") != window
    assert _pixel(d, ".panel[data-kind=sr]", 0.5, 0.5) != centre
    window = d.execute_script("return document.body.dataset.window")
    d.find_element(By.ID, "wl-width").send_keys(Keys.PAGE_UP * 3)
    _drawn(d)
    assert d.execute_script("return document.body.dataset.window") != window

    # zoom (wheel) is shared by every viewport
    before_zoom = float(d.find_element(By.ID, "split").get_attribute("data-zoom"))
    panel = _column(d, ".panel[data-kind=bicubic]", 0.3)
    wheel_zoom(d, 4)
    _drawn(d)
    assert float(d.find_element(By.ID, "split").get_attribute("data-zoom")) > 1.5 * before_zoom
    assert _column(d, ".panel[data-kind=bicubic]", 0.3) != panel
    d.save_screenshot(str(SHOTS / "viewer_test_compare.png"))

    # downloads: the SR as a 16-bit PNG of the SR's size
    job = d.find_element(By.ID, "dl-png").get_attribute("href")
    status, headers, body = _get(job)
    assert status == 200 and headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(body))
    assert png.mode.startswith("I") and png.size == hw
    served = np.asarray(png, dtype=np.float64) / 65535
    assert np.abs(served - sr).max() < 1e-3  # same seed, same tiles: the same SR

    urls = requested_urls(d)
    assert urls and all(u.startswith(viewer.base) or u.startswith(("data:", "blob:")) for u in urls)
    assert not [e for e in d.get_log("browser") if e["level"] == "SEVERE"]


def test_browser_reports_a_bad_file_without_a_traceback(viewer, browser, tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"this is not a PNG" * 10)
    browser.get(viewer.base)
    upload(browser, bad, UPSCALE)
    assert wait_job(browser) == "failed"
    message = browser.find_element(By.ID, "message").text
    assert "scan.png: not a readable image" in message
    assert "Traceback" not in browser.page_source
    assert str(tmp_path) not in message and "upload" not in message


def test_browser_refuses_to_upscale_the_whole_radiograph(viewer, browser):
    """The real RG1_UNCI.dcm (6.9 MB, 1955x1841) uploads, and upscaling it (a 7820x7364 SR,
    57.6 MP) is refused by the default output limit with a message that names the way out."""
    browser.get(viewer.base)
    upload(browser, Path(get_testdata_file("RG1_UNCI.dcm")), UPSCALE)
    assert wait_job(browser, timeout_s=60) == "failed"
    message = browser.find_element(By.ID, "message").text
    assert "a 1955x1841 LR gives a 7820x7364 SR (57.6 MP)" in message
    assert "limit of 40.0 MP (--max-output-mp)" in message
    assert "'score on this image' works at its own size" in message


@pytest.mark.slow
def test_server_down_and_limits(browser, radiograph, tmp_path):
    """A viewer whose Triton is not running says so in the page and on each job; uploads
    over the size limit and images over the output limit are refused with a message."""
    v = ViewerProcess(
        f"127.0.0.1:{free_port()}",
        tmp_path / "viewer.log",
        "--max-upload-mb",
        "2",
        "--max-output-mp",
        "1",
        "--dicomweb-url",
        f"http://127.0.0.1:{free_port()}/dicom-web",
    )
    try:
        browser.get(v.base)
        wait_server_status(browser, ready=False)
        assert "not answering" in browser.find_element(By.ID, "server-status").text
        upload(browser, radiograph, NATIVE)
        assert wait_job(browser) == "failed"
        assert "Triton server is not answering" in browser.find_element(By.ID, "message").text

        status, body = _post_refused_early(v.base + "api/jobs?name=big.dcm", 3 * 2**20)
        assert status == 413 and "larger than this viewer accepts (2 MB" in body["error"]
        job = _run(v, radiograph.read_bytes(), mode=UPSCALE, name="rg1.dcm")
        assert job["state"] == FAILED and "over this viewer's limit of 1.0 MP" in job["message"]
        status, body = _post(v.base + "api/jobs?mode=x", b"1")
        assert status == 400 and "mode must be one of" in body["error"]
        status, body = _post(v.base + "api/jobs?steps=0", b"1")
        assert status == 400 and "'steps'" in body["error"]
        assert _get(v.base + "api/jobs/nope")[0] == 404
        status, _, body = _get(v.base + "api/pacs/studies?patient_id=P1")
        assert status == 503 and "The PACS is not answering" in json.loads(body)["error"]
    finally:
        assert v.stop() == 0


def test_downloads_derived_dicom_of_an_upscaled_dicom(viewer, tmp_path):
    """A DICOM upscaled in the viewer downloads as the derived instance of
    ``client.dicom.derive_instance``: 4x its rows and columns, in the source's study, with
    the source referenced; a PNG upload has no derived DICOM, and says why."""
    path = _small_rg1(tmp_path / "rg1_tiny.dcm", 12)
    source = pydicom.dcmread(path)
    job = _run(viewer, path.read_bytes(), mode=UPSCALE, name=path.name)
    assert job["state"] == "done", job["message"]
    assert job["dicom"] is None and job["model"]
    status, headers, body = _get(f"{viewer.base}api/jobs/{job['id']}/sr.dcm")
    assert status == 200 and headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(body))
    assert (ds.Rows, ds.Columns) == (4 * source.Rows, 4 * source.Columns)
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]

    png = tmp_path / "rg1_tiny.png"
    Image.fromarray((read_image(path) * 255).astype(np.uint8)).save(png)
    job = _run(viewer, png.read_bytes(), mode=UPSCALE, name=png.name)
    assert job["state"] == "done" and "needs a DICOM upload" in job["dicom"]
    status, _, body = _get(f"{viewer.base}api/jobs/{job['id']}/sr.dcm")
    assert status == 409 and "needs a DICOM upload" in json.loads(body)["error"]


@pytest.mark.integration
def test_browser_opens_a_study_from_the_pacs(orthanc, server, browser, tmp_path):
    """With --dicomweb-url, the page searches the PACS (a real Orthanc, QIDO-RS), lists the
    study and opens its chest radiograph (WADO-RS; the study's CT is passed over)."""
    orthanc.clear()
    rg = small_radiograph(tmp_path / "study" / "rg.dcm", factor=16)  # 122x115
    orthanc.upload(rg)
    orthanc.upload(ct_slice(tmp_path / "study" / "ct.dcm", rg))
    source = pydicom.dcmread(rg)
    credentials = {"CXR_SR_PACS_USER": USER, "CXR_SR_PACS_PASSWORD": PASSWORD}
    args = ("--tile", str(TILE), "--dicomweb-url", orthanc.dicomweb_url)
    with ViewerProcess(server.http_url, tmp_path / "v.log", *args, env=credentials) as v:
        d = browser
        d.get(v.base)
        wait_server_status(d, ready=True)
        assert d.find_element(By.ID, "pacs").is_displayed()
        d.find_element(By.ID, "patient_id").send_keys("nobody")
        d.find_element(By.ID, "pacs-find").click()
        note = d.find_element(By.ID, "pacs-note")
        WebDriverWait(d, 30).until(lambda d: note.text == "no study matches")
        d.find_element(By.ID, "patient_id").clear()
        d.find_element(By.ID, "patient_id").send_keys(str(source.PatientID))
        d.find_element(By.ID, "pacs-find").click()
        WebDriverWait(d, 30).until(lambda d: note.text == "1 study")
        studies = d.find_element(By.ID, "studies")
        assert studies.get_attribute("value") == source.StudyInstanceUID
        assert "CR" in studies.text and "CT" in studies.text
        d.find_element(By.CSS_SELECTOR, "input[name=mode][value=upscale]").click()
        d.find_element(By.ID, "pacs-open").click()
        assert wait_job(d) == "done", d.find_element(By.ID, "message").text
        rows, cols = source.Rows, source.Columns
        assert _panel_sizes(d)["sr"] == (4 * cols, 4 * rows, 4 * cols, 4 * rows)
        assert d.find_element(By.ID, "dl-dcm").get_attribute("aria-disabled") == "false"
        assert str(source.PatientID) in d.find_element(By.ID, "metrics-note").text
        d.save_screenshot(str(SHOTS / "viewer_test_pacs.png"))


def test_run_job_messages(tmp_path, radiograph):
    """``run_job`` ends a job with a message for the page, never an exception."""
    bad = tmp_path / "u" / "upload.png"
    bad.parent.mkdir()
    bad.write_bytes(b"nope")
    with SRClient(f"127.0.0.1:{free_port()}") as c:
        job = Job(name="mine.png", mode=UPSCALE, path=bad, sampling={})
        run_job(job, c, 10**9)
        assert job.state == FAILED and job.message.startswith("mine.png: not a readable image")
        job = Job(name="rg1.dcm", mode=NATIVE, path=radiograph, sampling={})
        run_job(job, c, 10**9)
        assert job.state == FAILED and "not answering" in job.message
        assert job.input_size == (488, 460)


def test_job_summary_is_strict_json(radiograph):
    """A flat image's bicubic is exact (infinite PSNR): the summary stays valid JSON."""
    job = Job(name="flat.png", mode=NATIVE, path=radiograph, sampling={})
    job.metrics = {"psnr_sr": 41.5, "psnr_bicubic": float("inf"), "ssim_sr": None}
    summary = json.loads(json.dumps(job.summary(), allow_nan=False))
    assert summary["metrics"] == {"psnr_sr": 41.5, "psnr_bicubic": "inf", "ssim_sr": None}


def test_cli_usage_errors(tmp_path, capsys):
    assert cli.main(["--url", "nohost", "--serve-repository", str(tmp_path)]) == 2
    assert "host:port" in capsys.readouterr().err
    port = free_port()
    assert cli.main(["--url", f"127.0.0.1:{port}", "--serve-repository", str(tmp_path)]) == 2
    assert "not a built repository" in capsys.readouterr().err
    assert cli.main(["--url", f"10.0.0.1:{port}", "--serve-repository", str(tmp_path)]) == 2
    assert "on this machine" in capsys.readouterr().err
    assert cli.main(["--dicomweb-url", "pacs.example.org/dicom-web"]) == 2
    assert "DICOMweb URL must be http(s)://" in capsys.readouterr().err
    assert cli.main(["--dicomweb-url", "http://pacs/dw", "--credentials-file", "nope.json"]) == 2
    assert "credentials file nope.json: cannot read it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--steps", "0"])
    assert "'steps'" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_starts_and_stops_a_local_server(built_repository, tmp_path):
    """``--serve-repository`` (what ``make viewer`` passes) starts tritonserver at --url when
    nothing listens there, and stops it with the viewer."""
    repo, _ = built_repository
    port = free_port()
    v = ViewerProcess(f"127.0.0.1:{port}", tmp_path / "viewer.log", "--serve-repository", str(repo))
    try:
        status = json.loads(_get(v.base + "api/status")[2])
        assert status["triton"]["ready"], status
        assert status["triton"]["lr_sides"] == [16, 128]
    finally:
        assert v.stop() == 0
    assert not cli._listening("127.0.0.1", port)
    assert "tritonserver" in v.log.read_text()
