"""The cxr-sr CLI and SRClient: argparse, unreachable server, and runs against the real
tritonserver of ``conftest.server`` (tiny random weights).

What a real server cannot show is what the client put on the wire, so some tests use a tiny
in-process recorder speaking the KServe v2 HTTP protocol (binary tensors; its "model" is
bicubic upsampling, any size up to a configured maximum side): they check how ``SRClient``
splits batches, which request parameters it sends, how a 400 is translated, and how
``upscale`` tiles an image (bicubic is local, so the tiled result must equal the whole one).
Everything else runs against tritonserver.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_triton import FakeTriton, model_config

from cxr_sr.client.cli import build_parser, main
from cxr_sr.client.exit_codes import EXIT_CODES, EXIT_UNREACHABLE, EXIT_USAGE
from cxr_sr.client.io import read_image, write_png
from cxr_sr.client.report import bicubic_baseline, format_table, side_by_side
from cxr_sr.client.triton import (
    DEFAULT_LIMITS,
    SizeLimits,
    SRClient,
    SRConnectionError,
    SRServerError,
    limits_from_config,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def fake_server(request) -> Iterator[tuple[str, list[dict]]]:
    with FakeTriton(getattr(request, "param", None)) as fake:
        yield fake.url, fake.requests


# --- argparse ---------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_of_every_command_has_help() -> None:
    """Flags and positional arguments of every command (a command selector's choices are
    the commands, each checked in turn)."""
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"


def test_help_runs_as_a_module_and_lists_the_exit_codes() -> None:
    def run(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "cxr_sr.client.cli", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    top, upscale = run("--help"), run("upscale", "--help")
    assert "upscale" in top and "exit codes" in top
    assert "--out" in upscale and "--eval" in upscale and "--concurrency" in upscale
    for code, meaning in EXIT_CODES.items():
        assert f"{code}  {meaning}" in top and f"{code}  {meaning}" in upscale


def test_missing_out_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``cxr-sr x.png`` means ``cxr-sr upscale x.png``; both lack --out."""
    for argv in (["x.png"], ["upscale", "x.png"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == EXIT_USAGE
        assert "--out" in capsys.readouterr().err


def test_client_does_not_import_heavy_packages() -> None:
    code = (
        "import sys, client, client.cli; "
        "bad = [m for m in ('torch', 'diffusers', 'onnxruntime') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sr_client_import_leaves_the_study_stack_unloaded() -> None:
    """`from cxr_sr.client import SRClient` loads no DICOM-network or DICOM-writing library;
    every exported name still resolves on first use, and an unknown one is an AttributeError."""
    code = (
        "import sys\n"
        "from cxr_sr.client import SRClient\n"
        "study = ('highdicom', 'pynetdicom', 'dicomweb_client')\n"
        "bad = [m for m in study if m in sys.modules]\n"
        "assert not bad, f'imported {bad}'\n"
        "import cxr_sr.client as c\n"
        "missing = [n for n in c.__all__ if getattr(c, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'highdicom' in sys.modules\n"
        "assert set(dir(c)) >= set(c.__all__)\n"
        "try:\n"
        "    c.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- server unreachable -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    write_png(tmp_path / "a.png", np.zeros((64, 64)))
    url = f"127.0.0.1:{_free_port()}"
    code = main([str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--url", url,
                 "--protocol", protocol, "--quiet", "--retries", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_UNREACHABLE
    assert len(err) == 1 and err[0].startswith("cxr-sr: error:") and url in err[0]
    assert not (tmp_path / "out").exists()


def test_srclient_validation_and_connection_error() -> None:
    c = SRClient(f"127.0.0.1:{_free_port()}", timeout_s=2)
    assert not c.is_ready()
    ok = np.zeros((2, 1, 64, 64), np.float32)
    with pytest.raises(SRConnectionError, match="cannot reach"):
        c.super_resolve(ok)  # the size limits come from the server
    with pytest.raises(SRConnectionError, match="cannot reach"):
        c.upscale(ok[0, 0])
    for bad, match in [
        (np.zeros((1, 64, 64), np.float32), "shape"),
        (np.zeros((1, 1, 64, 64), np.uint8), "floating"),
        (np.full((1, 1, 64, 64), 1.5, np.float32), r"\[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            c.super_resolve(bad)
    fixed = SRClient(f"127.0.0.1:{_free_port()}", limits=SizeLimits(64, 64))
    with pytest.raises(ValueError, match="shape.*64x64.*upscale"):
        fixed.super_resolve(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="steps"):
        c.super_resolve(ok, steps=0)
    with pytest.raises(ValueError, match="sampler"):
        c.super_resolve(ok, sampler="euler")
    with pytest.raises(ValueError, match="image"):
        c.upscale(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(TypeError, match="origin_y"):
        c.upscale(ok[0, 0], origin_y=4)
    with pytest.raises(ValueError, match="protocol"):
        SRClient(protocol="websocket")
    with pytest.raises(ValueError, match="scheme"):
        SRClient("http://127.0.0.1:8000")


def test_limits_from_config() -> None:
    assert limits_from_config(model_config(16, 256)) == SizeLimits(16, 256)
    fixed = {"max_batch_size": 8, "input": [{"name": "LR", "dims": ["1", "64", "64"]}]}
    assert limits_from_config(fixed) == SizeLimits(64, 64)  # gRPC's JSON has string dims
    dynamic = {"max_batch_size": 8, "input": [{"name": "LR", "dims": [1, -1, -1]}]}
    assert limits_from_config(dynamic) == DEFAULT_LIMITS
    with pytest.raises(SRServerError, match="no input"):
        limits_from_config({"input": [{"name": "x", "dims": [1, 64, 64]}]})
    published = model_config(16, 256)
    published["parameters"].update(
        max_request_pixels={"string_value": "65536"}, lr_multiple={"string_value": "4"}
    )
    limits = limits_from_config(published)
    assert (limits.max_request_pixels, limits.multiple) == (65536, 4)
    assert limits.rows_per_request(128, 128, 8) == 4  # 4 x 16,384 pixels
    assert limits.rows_per_request(126, 126, 8) == 4  # counted padded to 128, as the server does
    assert limits.rows_per_request(256, 256, 8) == 1  # one image even where it alone is over
    assert SizeLimits(16, 256).rows_per_request(256, 256, 8) == 8  # no published limit


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


def test_upscale_tiles_send_their_origins_and_blend_seamlessly(fake_server) -> None:
    """A 100x76 image on a server taking sides up to 64: tiles of at most 64, each its own
    request with its origin, all sampling keywords on each; bicubic being local, the blend
    is exactly the whole-image bicubic."""
    url, requests = fake_server
    image = np.random.default_rng(1).random((100, 76)).astype(np.float32)
    seen = []
    with SRClient(url, in_flight=3) as c:
        assert c.limits() == SizeLimits(16, 64)
        plan = c.tile_plan(100, 76)
        sr = c.upscale(image, steps=2, seed=5, progress=lambda d, t: seen.append((d, t)))
    assert sr.shape == (400, 304) and sr.dtype == np.float32
    np.testing.assert_allclose(sr, bicubic_baseline(image), atol=1e-5)
    assert len(requests) == len(plan) > 1
    assert plan.tile_h <= 64 and plan.tile_w <= 64
    assert all(r["shape"] == (1, 1, plan.tile_h, plan.tile_w) for r in requests)
    origins = sorted((r["parameters"]["origin_y"], r["parameters"]["origin_x"]) for r in requests)
    assert origins == sorted(t.origin for t in plan.tiles)
    assert all(r["parameters"]["steps"] == 2 and r["parameters"]["seed"] == 5 for r in requests)
    assert seen[-1] == (len(plan), len(plan)) and all(0 < d <= t for d, t in seen)


def test_upscale_small_images_are_one_request_or_padded(fake_server) -> None:
    url, requests = fake_server
    rng = np.random.default_rng(2)
    with SRClient(url) as c:
        image = rng.random((40, 23)).astype(np.float32)
        sr = c.upscale(image, seed=1)
        np.testing.assert_array_equal(sr, c.super_resolve(image[None, None], seed=1)[0, 0])
        assert requests[-1]["parameters"] == {"seed": 1}  # a whole image names no origin
        tiny = rng.random((5, 30)).astype(np.float32)  # below the server's 16: mirrored out
        sr = c.upscale(tiny)
        assert requests[-1]["shape"] == (1, 1, 16, 30) and sr.shape == (20, 120)
        # away from the mirrored bottom edge it is the bicubic of the image itself
        np.testing.assert_allclose(sr[:10], bicubic_baseline(tiny)[:10], atol=1e-5)


# --- against the real server ------------------------------------------------------------


def _bits(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.mode


def test_cli_upscales_at_the_input_geometry_and_bit_depth(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Default mode: every input is the LR; 100x76 -> 400x304 (tiled where the server's
    maximum side is smaller), 8-bit stays 8-bit, 16-bit stays 16-bit; LR consistency reported."""
    from PIL import Image

    from cxr_sr.client import metrics

    rng = np.random.default_rng(1)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    grad = np.clip(np.add.outer(np.linspace(0, 1, 100), np.linspace(0, 0.5, 76)), 0, 1)
    write_png(inputs / "odd.png", grad, bits=8)
    write_png(inputs / "sub" / "odd.png", grad[::-1], bits=16)
    write_png(inputs / "small.png", rng.random((64, 64)), bits=16)
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    code = main([str(inputs), "--out", str(out), "--url", server.http_url, "--steps", "2",
                 "--seed", "1", "--in-flight", "2", "--json", str(report), "--side-by-side",
                 "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1  # broken.png failed, the rest went through
    assert "broken.png" in captured.err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_sr.png")) == [
        "odd_sr.png",
        "small_sr.png",
        "sub/odd_sr.png",
    ]
    with Image.open(out / "odd_sr.png") as im:
        assert im.size == (304, 400) and im.mode == "L"
    with Image.open(out / "sub" / "odd_sr.png") as im:
        assert im.size == (304, 400) and im.mode.startswith("I")
    assert read_image(out / "small_sr.png").shape == (256, 256)
    assert (out / "odd_compare.png").is_file()
    assert "upscale" in captured.out and "LR PSNR SR" in captured.out
    assert "mean (3)" in captured.out

    data = json.loads(report.read_text())
    assert data["mode"]["name"] == "upscale"
    assert data == json.loads((out / "report.json").read_text())
    rows = {r["key"]: r for r in data["rows"] if r["status"] == "done"}
    assert set(rows) == {"odd", "small", "sub/odd"}
    (broken,) = [r for r in data["rows"] if r["status"] == "failed"]
    assert broken["key"] == "broken" and "not a readable image" in broken["error"]
    assert data["summary"] == {"done": 3, "failed": 1, "skipped": 0, "pending": 0}
    assert rows["odd"]["out_size"] == "400x304" and rows["odd"]["bits"] == 8
    assert rows["small"]["tiles"] == 1 and rows["odd"]["psnr_sr"] is None  # no reference
    sr = read_image(out / "sub" / "odd_sr.png")
    lr = read_image(inputs / "sub" / "odd.png")
    assert rows["sub/odd"]["lr_psnr_sr"] == pytest.approx(metrics.lr_psnr(sr, lr), abs=0.02)
    assert rows["sub/odd"]["lr_psnr_bicubic"] == pytest.approx(
        metrics.lr_psnr(bicubic_baseline(lr), lr), abs=1e-6)  # fmt: skip


@pytest.mark.parametrize("protocol", ["reference", "native"])
def test_cli_eval_protocols(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    """--eval: the image is the HR of the protocol; metrics are those of the written SR
    against it, and the scale is printed."""
    from cxr_sr.client import metrics
    from cxr_sr.imaging import native_pair, reference_pair

    image = np.clip(np.add.outer(np.linspace(0, 1, 300), np.linspace(0, 0.5, 258)), 0, 1)
    image = image + 0.05 * np.sin(np.arange(258) / 3.0)[None, :]
    write_png(tmp_path / "in.png", np.clip(image, 0, 1), bits=16)
    report = tmp_path / "report.json"
    code = main([str(tmp_path / "in.png"), "--out", str(tmp_path / "o"), "--url",
                 server.http_url, "--eval", protocol, "--json", str(report),
                 "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert f"{protocol} protocol" in captured.out and "PSNR bicubic" in captured.out
    (row,) = json.loads(report.read_text())["rows"]
    hr, lr = (reference_pair if protocol == "reference" else native_pair)(
        read_image(tmp_path / "in.png")
    )
    sr = read_image(tmp_path / "o" / "in_sr.png")
    assert sr.shape == hr.shape == ((256, 256) if protocol == "reference" else (300, 256))
    assert row["scale"].startswith(f"{hr.shape[0]}x{hr.shape[1]} / {lr.shape[0]}x{lr.shape[1]}")
    assert row["psnr_sr"] == pytest.approx(metrics.psnr(sr, hr), abs=0.01)
    assert row["ssim_bicubic"] == pytest.approx(metrics.ssim(bicubic_baseline(lr), hr), abs=1e-6)
    assert row["lr_psnr_sr"] == pytest.approx(metrics.lr_psnr(sr, lr), abs=0.02)


def test_cli_reference_protocol_needs_256_pixels(server, tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((64, 64)))
    code = main([str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--url",
                 server.http_url, "--eval", "reference", "--quiet"])  # fmt: skip
    assert code == 1
    assert not (tmp_path / "o" / "a_sr.png").exists()


def test_cli_writes_derived_dicom_instances(server, tmp_path: Path) -> None:
    """--dicom: each in-domain DICOM input gets its derived instance (4x, same study,
    deterministic UIDs, the served SR's pixels); a CT is skipped with its reason (exit 0)
    unless --force; a PNG input gets its PNG only."""
    import pydicom
    from pydicom.data import get_testdata_file

    from cxr_sr.client.dicom import derived_uids
    from cxr_sr.client.io import dataset_image

    source = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    arr = np.ascontiguousarray(source.pixel_array[::40, ::40])  # 49x47: a small study
    source.Rows, source.Columns = arr.shape
    source.PixelData = arr.astype(np.uint16).tobytes()
    (tmp_path / "study").mkdir()
    source.save_as(tmp_path / "study" / "cr.dcm", enforce_file_format=True)
    ct = copy.deepcopy(source)
    ct.Modality, ct.SOPInstanceUID = "CT", source.SOPInstanceUID + ".1"
    ct.save_as(tmp_path / "study" / "ct.dcm", enforce_file_format=True)
    write_png(tmp_path / "lr.png", np.full((64, 64), 0.5))
    out = tmp_path / "o"
    args = [str(tmp_path / "study"), str(tmp_path / "lr.png"), "--out", str(out), "--url",
            server.grpc_url, "--protocol", "grpc", "--dicom", "--seed", "1", "--quiet"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    status = {r["key"]: r["status"] for r in report["rows"]}
    assert status == {"cr": "done", "ct": "skipped", "lr": "done"}
    (ct_row,) = [r for r in report["rows"] if r["key"] == "ct"]
    assert "modality CT" in ct_row["error"] and "--force" in ct_row["error"]
    assert sorted(p.name for p in out.glob("*_sr.*")) == ["cr_sr.dcm", "cr_sr.png", "lr_sr.png"]

    derived = pydicom.dcmread(out / "cr_sr.dcm")
    with SRClient(server.http_url) as c:
        identity = c.model_identity()
        want = c.upscale(dataset_image(source), seed=1)
    assert (derived.SeriesInstanceUID, derived.SOPInstanceUID) == derived_uids(source, identity)
    assert derived.StudyInstanceUID == source.StudyInstanceUID
    assert derived.PatientID == source.PatientID
    assert (derived.Rows, derived.Columns) == (196, 188)
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (row,) = [r for r in report["rows"] if r["key"] == "cr"]
    assert row["weights_sha256"] == identity.weights_sha256 in derived.DerivationDescription
    np.testing.assert_allclose(read_image(out / "cr_sr.dcm"), want, atol=0.5 / 29999 + 1e-5)

    # a re-run with --force does the CT, and only the CT
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_sr.*")}
    assert main([*args, "--force"]) == 0
    assert (out / "ct_sr.dcm").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_sr.*") if p.name in before} == before
    # another sampling setting: the earlier results are stale; refused unless redone
    assert main([*args, "--seed", "2"]) == EXIT_USAGE
    assert main([*args, "--seed", "2", "--on-change", "redo"]) == 0


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
    odd = lr[:30, :17]  # any LR size: panels 4x it
    assert side_by_side(odd, None, bicubic_baseline(odd)).shape == (120, 3 * 68 + 2 * 4)


def test_format_table() -> None:
    rows = [{"name": "a", "psnr": 30.123456, "n": 3}, {"name": "longer name", "psnr": None}]
    text = format_table(rows, [("name", "image"), ("psnr", "PSNR", ".2f"), "n"])
    lines = text.splitlines()
    assert lines[0].split() == ["image", "PSNR", "n"]
    assert "30.12" in lines[2] and lines[3].split() == ["longer", "name", "-", "-"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned
