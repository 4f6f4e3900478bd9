"""Bad files in a batch (issue: hostile input): each gets one clear line in the report, the
batch goes on with the good image next to it, and the exit code follows the table
(``client.exit_codes``: 1 when an input failed, 0 when it was only skipped on purpose).

One matrix against the real tritonserver of ``conftest.server``. Tests run as root, so
``chmod 000`` would not stop a read: unreadable entries are a broken symbolic link and a
folder named like an image.
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_dicom_derived import rg1_small, synthetic

from cxr_sr.client.batch import run_batch
from cxr_sr.client.exit_codes import EXIT_INPUT_FAILED, EXIT_OK
from cxr_sr.client.io import write_png


def _png_bytes(side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side), np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _jpeg_bytes(side: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (side, side), np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _huge_png_header() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels (and whose data is missing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c")


_PIXEL_MODULE = {"PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"}
_PIXEL_MODULE |= {"PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"}


def _structured_report() -> pydicom.Dataset:
    """A DICOM SR document: a valid DICOM file with no pixel data."""
    ds = synthetic()
    pixel_module = [k for k in ds.dir() if k in _PIXEL_MODULE]
    for keyword in pixel_module:
        del ds[keyword]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.Modality = "SR"
    return ds


def _ct() -> pydicom.Dataset:
    ds = copy.deepcopy(synthetic())
    ds.Modality = "CT"
    return ds


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return make


def _symlink(folder: Path) -> Path:
    (folder / "gone.png").symlink_to(folder / "missing.png")
    return folder


def _folder_named_like_an_image(folder: Path) -> Path:
    (folder / "scan.png").mkdir()
    return folder


def _empty_folder(folder: Path) -> Path:
    empty = folder.parent / "empty"
    empty.mkdir()
    return empty


# name -> (make the bad input in a folder, return what to pass), status, reason, exit code
CASES = {
    "corrupt png": (_write("bad.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "failed",
                    "not a readable image", EXIT_INPUT_FAILED),
    "truncated png": (_write("cut.png", _png_bytes()[:120]), "failed", "not a readable image",
                      EXIT_INPUT_FAILED),
    "corrupt jpeg": (_write("bad.jpg", b"\xff\xd8\xff\xe0" + bytes(300)), "failed",
                     "not a readable image", EXIT_INPUT_FAILED),
    "truncated jpeg": (_write("cut.jpg", _jpeg_bytes()[:300]), "failed", "not a readable image",
                       EXIT_INPUT_FAILED),
    "corrupt dicom": (_write("bad.dcm", bytes(128) + b"DICM" + bytes(range(256)) * 2), "failed",
                      "DICOM", EXIT_INPUT_FAILED),
    "truncated dicom": (_write("cut.dcm", _dicom_bytes(rg1_small(40))[:4000]), "failed",
                        "DICOM", EXIT_INPUT_FAILED),
    "dicom without pixel data": (_write("report.dcm", _dicom_bytes(_structured_report())),
                                 "failed", "no image", EXIT_INPUT_FAILED),
    "zero bytes": (_write("zero.png", b""), "failed", "empty file (0 bytes)", EXIT_INPUT_FAILED),
    "broken symlink": (_symlink, "failed", "broken symbolic link", EXIT_INPUT_FAILED),
    "folder named like an image": (_folder_named_like_an_image, "failed",
                                   "named like an image but a folder", EXIT_INPUT_FAILED),
    "not an image": (_write("notes.txt", b"radiology notes, not pixels\n"), "failed",
                     "not a readable image", EXIT_INPUT_FAILED),
    "30000x30000 header": (_write("huge.png", _huge_png_header()), "failed",
                           "30000x30000 = 900.0 MP, above the limit", EXIT_INPUT_FAILED),
    "empty folder": (_empty_folder, "failed", "folder holds no image files", EXIT_INPUT_FAILED),
    "out of domain (CT)": (_write("ct.dcm", _dicom_bytes(_ct())), "skipped", "modality CT",
                           EXIT_OK),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_gets_one_line_and_the_batch_goes_on(server, tmp_path: Path, case: str) -> None:
    make, status, reason, exit_code = CASES[case]
    good = write_png(tmp_path / "good" / "good.png", np.linspace(0, 1, 16 * 16).reshape(16, 16))
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = make(bad_dir)
    lines: list[str] = []
    report = run_batch(
        [good, bad], tmp_path / "out", [server.http_url], progress=False, log=lines.append
    )
    assert report.exit_code == exit_code, report.summary()
    rows = {r["status"]: r for r in report.rows}
    assert len(report.rows) == 2 and set(rows) == {"done", status}
    assert rows["done"]["input"] == str(good) and (tmp_path / "out" / "good_sr.png").is_file()
    assert reason in rows[status]["error"]
    assert len([line for line in lines if reason in line]) == 1  # one clear line
    assert f"1 {status}" in report.summary()
