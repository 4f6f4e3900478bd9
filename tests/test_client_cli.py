"""The cxr-sr CLI and SRClient: argparse, unreachable server, and runs against the real
tritonserver of ``conftest.server`` (tiny random weights).

What a real server cannot show is what the client put on the wire, so one test uses a tiny
in-process recorder speaking the KServe v2 HTTP protocol (binary tensors): it checks how
``SRClient`` splits batches, which request parameters it sends, and how a 400 is translated.
Everything else runs against tritonserver.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cxr_sr.client.cli import build_parser, main
from cxr_sr.client.io import read_image, write_png
from cxr_sr.client.report import bicubic_baseline, format_table, side_by_side
from cxr_sr.client.triton import SRClient, SRConnectionError, SRServerError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FakeTriton(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[dict] = []  # replaced per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes, header_length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if header_length is not None:
            self.send_header("Inference-Header-Content-Length", str(header_length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        ok = self.path in ("/v2/health/live", "/v2/health/ready", "/v2/models/cxr_sr/ready")
        self._send(200 if ok else 404, b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v2/models/cxr_sr/infer":
            self._send(404, json.dumps({"error": "unknown model"}).encode())
            return
        n_json = int(self.headers.get("Inference-Header-Content-Length", len(body)))
        request = json.loads(body[:n_json])
        (inp,) = request["inputs"]
        lr = np.frombuffer(body[n_json:], dtype=np.float32).reshape(inp["shape"])
        params = request.get("parameters", {})
        type(self).requests.append({"batch": lr.shape[0], "parameters": params})
        if params.get("steps") == 999:
            msg = {"error": "steps (999) exceeds the 300 timesteps the plan covers"}
            self._send(400, json.dumps(msg).encode())
            return
        sr = bicubic_baseline(lr).astype(np.float32)
        raw = sr.tobytes()
        header = json.dumps(
            {
                "model_name": "cxr_sr",
                "outputs": [
                    {
                        "name": "SR",
                        "datatype": "FP32",
                        "shape": list(sr.shape),
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
            }
        ).encode()
        self._send(200, header + raw, header_length=len(header))


@pytest.fixture()
def fake_server() -> Iterator[tuple[str, list[dict]]]:
    handler = type("Handler", (_FakeTriton,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- argparse ---------------------------------------------------------------------------


def test_every_flag_has_help() -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"


def test_help_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cxr_sr.client.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--out" in out.stdout and "--lr-as-is" in out.stdout and "--protocol" in out.stdout


def test_missing_out_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["x.png"])
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_client_does_not_import_heavy_packages() -> None:
    code = (
        "import sys, client, client.cli; "
        "bad = [m for m in ('torch', 'diffusers', 'onnxruntime') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- server unreachable -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    write_png(tmp_path / "a.png", np.zeros((64, 64)))
    url = f"127.0.0.1:{_free_port()}"
    code = main([str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--url", url,
                 "--protocol", protocol, "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("cxr-sr: error:") and url in err[0]
    assert not (tmp_path / "out").exists()


def test_srclient_validation_and_connection_error() -> None:
    c = SRClient(f"127.0.0.1:{_free_port()}", timeout_s=2)
    assert not c.is_ready()
    ok = np.zeros((2, 1, 64, 64), np.float32)
    with pytest.raises(SRConnectionError, match="cannot reach"):
        c.super_resolve(ok)
    for bad, match in [
        (np.zeros((1, 64, 64), np.float32), "shape"),
        (np.zeros((1, 1, 32, 32), np.float32), "shape"),
        (np.zeros((1, 1, 64, 64), np.uint8), "floating"),
        (np.full((1, 1, 64, 64), 1.5, np.float32), r"\[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            c.super_resolve(bad)
    with pytest.raises(ValueError, match="steps"):
        c.super_resolve(ok, steps=0)
    with pytest.raises(ValueError, match="sampler"):
        c.super_resolve(ok, sampler="euler")
    with pytest.raises(ValueError, match="protocol"):
        SRClient(protocol="websocket")
    with pytest.raises(ValueError, match="scheme"):
        SRClient("http://127.0.0.1:8000")


# --- what goes on the wire (recorder) ----------------------------------------------------


def test_srclient_splits_batches_and_sends_only_given_parameters(fake_server) -> None:
    url, requests = fake_server
    lr = np.random.default_rng(0).random((11, 1, 64, 64)).astype(np.float32)
    with SRClient(url, max_batch=4) as c:
        c.wait_ready(5)
        sr = c.super_resolve(lr, steps=4, seed=7, sampler="ddim")
        assert sr.shape == (11, 1, 256, 256) and sr.dtype == np.float32
        np.testing.assert_allclose(sr, bicubic_baseline(lr), atol=1e-6)
        assert [r["batch"] for r in requests] == [4, 4, 3]
        assert requests[0]["parameters"] == {"steps": 4, "seed": 7, "sampler": "ddim"}
        c.super_resolve(lr[:1])
        assert requests[-1]["parameters"] == {}
        with pytest.raises(SRServerError, match="exceeds the 300 timesteps") as e:
            c.super_resolve(lr[:1], steps=999)
        assert not isinstance(e.value, SRConnectionError)


# --- against the real server ------------------------------------------------------------


def test_cli_end_to_end(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxr_sr.client import metrics
    from cxr_sr.client.prepare import prepare

    rng = np.random.default_rng(1)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    big = np.clip(np.add.outer(np.linspace(0, 1, 300), np.linspace(0, 0.5, 400)), 0, 1)
    write_png(inputs / "big.png", big)
    write_png(inputs / "sub" / "big.png", big[::-1])
    write_png(inputs / "small.png", rng.random((64, 64)))
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    code = main([str(inputs), "--out", str(out), "--url", server.http_url, "--steps", "2",
                 "--seed", "1", "--batch", "2", "--json", str(report), "--side-by-side",
                 "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1  # broken.png failed, the rest went through
    assert "broken.png" in captured.err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_sr.png")) == [
        "big_sr.png",
        "small_sr.png",
        "sub/big_sr.png",
    ]
    sr = read_image(out / "big_sr.png")
    assert sr.shape == (256, 256)
    assert (out / "big_compare.png").is_file()
    assert "PSNR SR" in captured.out and "mean (3)" in captured.out

    data = json.loads(report.read_text())
    assert [f["path"].endswith("broken.png") for f in data["failed"]] == [True]
    rows = {r["name"]: r for r in data["images"]}
    assert set(rows) == {"big", "small", "sub/big"}
    assert rows["small"]["psnr_sr"] is None  # a 64x64 input has no reference
    # the reported figures are those of the written 16-bit PNG against the protocol's HR
    lr, hr = prepare(read_image(inputs / "big.png"))
    assert rows["big"]["psnr_sr"] == pytest.approx(metrics.psnr(sr, hr), abs=0.01)
    assert rows["big"]["psnr_bicubic"] == pytest.approx(
        metrics.psnr(bicubic_baseline(lr), hr), abs=0.01)  # fmt: skip
    assert data["mean"]["psnr_sr"] == pytest.approx(
        np.mean([rows["big"]["psnr_sr"], rows["sub/big"]["psnr_sr"]])
    )


def test_cli_lr_as_is_rejects_other_sizes(server, tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((64, 64)))
    write_png(tmp_path / "b.png", np.zeros((80, 80)))
    code = main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "o"),
                 "--url", server.http_url, "--lr-as-is", "--quiet"])  # fmt: skip
    assert code == 1
    assert (tmp_path / "o" / "a_sr.png").is_file()
    assert not (tmp_path / "o" / "b_sr.png").exists()


def test_cli_writes_derived_dicom_series(server, tmp_path: Path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    source = get_testdata_file("RG1_UNCI.dcm")
    if source is None:
        pytest.skip("pydicom-data not installed")
    lr = np.full((64, 64), 0.5)
    write_png(tmp_path / "lr.png", lr)
    code = main([source, str(tmp_path / "lr.png"), "--out", str(tmp_path / "o"),
                 "--url", server.grpc_url, "--protocol", "grpc", "--dicom", "--batch", "1",
                 "--quiet"])  # fmt: skip
    assert code == 0
    a = pydicom.dcmread(tmp_path / "o" / "RG1_UNCI_sr.dcm")
    b = pydicom.dcmread(tmp_path / "o" / "lr_sr.dcm")
    assert a.PatientID == pydicom.dcmread(source, stop_before_pixels=True).PatientID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID  # one derived series per run
    assert (a.InstanceNumber, b.InstanceNumber) == (1, 2)
    with SRClient(server.http_url) as c:
        want = c.super_resolve(read_image(tmp_path / "lr.png")[None, None])[0, 0]
    np.testing.assert_allclose(read_image(tmp_path / "o" / "lr_sr.dcm"), want, atol=2e-5)


def test_cli_missing_input_is_reported_not_fatal(server, tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((64, 64)))
    code = main([str(tmp_path / "nope"), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                 "--url", server.http_url, "--quiet"])  # fmt: skip
    assert code == 1
    assert (tmp_path / "o" / "a_sr.png").is_file()


# --- report -----------------------------------------------------------------------------


def test_side_by_side_layout() -> None:
    lr = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    bic = bicubic_baseline(lr)
    strip = side_by_side(lr, None, bic, bic)
    assert strip.dtype == np.uint8 and strip.shape == (256, 4 * 256 + 3 * 4)
    assert (strip[:, 256:260] == 255).all()
    np.testing.assert_array_equal(strip[:4, :4], np.rint(lr[0, 0] * 255))  # nearest upsampling
    np.testing.assert_array_equal(strip[:, 260:516], strip[:, 520:776])
    assert side_by_side(lr, bic, bic, bits=16).shape == (256, 3 * 256 + 2 * 4)
    with pytest.raises(ValueError, match="sr"):
        side_by_side(lr, bic, lr)


def test_format_table() -> None:
    rows = [{"name": "a", "psnr": 30.123456, "n": 3}, {"name": "longer name", "psnr": None}]
    text = format_table(rows, [("name", "image"), ("psnr", "PSNR", ".2f"), "n"])
    lines = text.splitlines()
    assert lines[0].split() == ["image", "PSNR", "n"]
    assert "30.12" in lines[2] and lines[3].split() == ["longer", "name", "-", "-"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned
