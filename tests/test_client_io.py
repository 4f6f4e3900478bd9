"""client.io (reading PNG/JPEG/TIFF/DICOM, writing PNG, expanding inputs) and client.prepare."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_sr.client.io import (
    image_bits,
    image_size,
    is_dicom,
    iter_inputs,
    read_image,
    scan_inputs,
    write_png,
)
from cxr_sr.client.prepare import make_lr, prepare, to_reference_hr
from cxr_sr.imaging import area_downsample


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available (install pydicom-data)")
    return Path(path)


@pytest.fixture(scope="module")
def rg1() -> np.ndarray:
    return read_image(_testdata("RG1_UNCI.dcm"))


def _gradient(h: int = 48, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx / (w - 1)) * 0.7 + (yy / (h - 1)) * 0.3).astype(np.float64)


# --- Pillow formats ---------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip(tmp_path: Path, bits: int) -> None:
    x = _gradient()
    path = write_png(tmp_path / "a.png", x, bits=bits)
    with Image.open(path) as im:
        assert im.mode == ("L" if bits == 8 else "I;16")
    y = read_image(path)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=0.5 / (2**bits - 1) + 1e-7)


def test_image_bits_follow_the_container(tmp_path: Path) -> None:
    x = _gradient()
    assert image_bits(write_png(tmp_path / "a.png", x, bits=8)) == 8
    assert image_bits(write_png(tmp_path / "b.png", x, bits=16)) == 16
    Image.fromarray(np.uint8(x * 255)).convert("RGB").save(tmp_path / "c.jpg")
    assert image_bits(tmp_path / "c.jpg") == 8
    Image.fromarray(x.astype(np.float32)).save(tmp_path / "d.tif")
    assert image_bits(tmp_path / "d.tif") == 16
    shutil.copy(_testdata("RG1_UNCI.dcm"), tmp_path / "e.dcm")
    assert image_bits(tmp_path / "e.dcm") == 16
    (tmp_path / "f.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="f.png"):
        image_bits(tmp_path / "f.png")


def test_write_png_accepts_batched_singletons_and_rejects_bad_input(tmp_path: Path) -> None:
    x = _gradient()
    write_png(tmp_path / "b.png", x[None, None])
    np.testing.assert_allclose(read_image(tmp_path / "b.png"), x, atol=1e-5)
    with pytest.raises(ValueError, match="bits"):
        write_png(tmp_path / "c.png", x, bits=12)
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "c.png", np.stack([x, x]))


def test_16bit_tiff(tmp_path: Path) -> None:
    x = _gradient()
    q = np.rint(x * 65535).astype(np.uint16)
    Image.fromarray(q).save(tmp_path / "a.tif")
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), q / 65535.0, atol=1e-6)


def test_8bit_tiff_and_float_tiff(tmp_path: Path) -> None:
    x = _gradient()
    Image.fromarray(np.rint(x * 255).astype(np.uint8)).save(tmp_path / "a.tiff")
    np.testing.assert_allclose(read_image(tmp_path / "a.tiff"), x, atol=0.5 / 255 + 1e-6)
    Image.fromarray(x.astype(np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_allclose(read_image(tmp_path / "f.tif"), x, atol=1e-6)


def test_8bit_jpeg(tmp_path: Path) -> None:
    x = _gradient(64, 64)
    Image.fromarray(np.rint(x * 255).astype(np.uint8)).save(tmp_path / "a.jpg", quality=95)
    y = read_image(tmp_path / "a.jpg")
    assert y.shape == (64, 64)
    assert np.abs(y - x).max() < 4 / 255


def test_rgb_becomes_luma_gray(tmp_path: Path) -> None:
    x = _gradient()
    g = np.rint(x * 255).astype(np.uint8)
    Image.fromarray(np.stack([g, g, g], axis=-1)).save(tmp_path / "gray_rgb.png")
    np.testing.assert_allclose(read_image(tmp_path / "gray_rgb.png"), g / 255.0, atol=1e-6)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    np.testing.assert_allclose(read_image(tmp_path / "red.png"), 0.299, atol=1e-6)
    Image.fromarray(np.dstack([g, g, g, g])).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), g / 255.0, atol=1e-6)


def test_unreadable_files_raise_value_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match="garbage.png"):
        read_image(garbage)
    fake_dicom = tmp_path / "fake.dcm"
    fake_dicom.write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="fake.dcm"):
        read_image(fake_dicom)
    with pytest.raises(ValueError, match="no such file"):
        read_image(tmp_path / "missing.png")


# --- DICOM ------------------------------------------------------------------------------


def test_rg1_monochrome1_is_windowed_and_inverted(rg1: np.ndarray) -> None:
    import pydicom

    ds = pydicom.dcmread(_testdata("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert rg1.shape == (1955, 1841) and rg1.dtype == np.float32
    assert rg1.min() >= 0.0 and rg1.max() <= 1.0
    # Manual display pipeline: LINEAR window (PS3.3 C.11.2.1.2.1), then inversion.
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(np.float64)
    manual = 1.0 - np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(rg1, manual, atol=1e-6)
    # Anatomy: spine/mediastinum (centre) brighter than the lung fields on either side.
    mediastinum = rg1[600:1000, 860:980].mean()
    lungs = (rg1[600:1000, 400:600].mean() + rg1[600:1000, 1250:1450].mean()) / 2
    assert mediastinum > lungs + 0.05


# RG1_J2KI decodes to the same pixels; RG1_J2KR is lossy (measured: max 0.013, mean 0.0017).
@pytest.mark.parametrize(
    ("name", "max_err", "mean_err"), [("RG1_J2KI.dcm", 1e-6, 1e-7), ("RG1_J2KR.dcm", 0.03, 0.005)]
)
def test_jpeg2000_variants_match_uncompressed(
    rg1: np.ndarray, name: str, max_err: float, mean_err: float
) -> None:
    pytest.importorskip("openjpeg")
    y = read_image(_testdata(name))
    assert y.shape == rg1.shape
    assert np.abs(y - rg1).max() <= max_err
    assert np.abs(y - rg1).mean() <= mean_err


def test_missing_decoder_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.dataset

    def no_decoder(self):
        raise RuntimeError("Unable to decode the pixel data: no plugins available")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    with pytest.raises(ValueError, match="pylibjpeg-openjpeg"):
        read_image(_testdata("RG1_J2KI.dcm"))


def test_dicom_detected_by_content_and_folders_expanded(tmp_path: Path) -> None:
    study = tmp_path / "study"
    (study / "series1").mkdir(parents=True)
    (study / "series0").mkdir()
    shutil.copy(_testdata("RG1_UNCI.dcm"), study / "series1" / "IM0001")
    write_png(study / "series0" / "b.png", _gradient())
    write_png(study / "a.PNG", _gradient())
    (study / "notes.txt").write_text("not an image")
    (study / "README").write_text("no suffix, not DICOM")
    (study / ".hidden.png").write_bytes(b"")
    assert is_dicom(study / "series1" / "IM0001")
    assert not is_dicom(study / "README")

    found = iter_inputs([study])
    rel = [p.relative_to(study).as_posix() for p in found]
    assert rel == ["a.PNG", "series0/b.png", "series1/IM0001"]
    # Explicit files are kept whatever their suffix; duplicates dropped.
    assert iter_inputs([study / "notes.txt", study / "notes.txt"]) == [study / "notes.txt"]
    assert iter_inputs(study / "a.PNG") == [study / "a.PNG"]
    with pytest.raises(ValueError, match="no such"):
        iter_inputs([tmp_path / "nope"])
    assert read_image(study / "series1" / "IM0001").shape == (1955, 1841)


def test_dataset_image_is_read_image_and_display_values_tabulate(tmp_path: Path) -> None:
    """``dataset_image`` is ``read_image``'s DICOM reading; ``display_values`` maps any
    stored codes the same way (RG1: MONOCHROME1, window 15000/30000: bone bright)."""
    import pydicom

    from cxr_sr.client.io import dataset_image, display_values

    path = _testdata("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(dataset_image(ds), read_image(path), atol=1e-6)
    table = display_values(ds, np.array([0, 15000, 29999, 40000]))
    np.testing.assert_allclose(table, [1.0, 0.5, 0.0, 0.0], atol=1e-4)  # inverted window


def test_scan_inputs_reports_what_cannot_be_an_input(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "dir.png").mkdir(parents=True)  # a folder named like an image
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    write_png(folder / "ok.png", _gradient())
    (tmp_path / "empty").mkdir()
    files, problems = scan_inputs([folder, tmp_path / "empty", tmp_path / "nope"])
    assert files == [folder / "ok.png"]
    reasons = {p.name: r for p, r in problems}
    assert reasons == {
        "dir.png": "named like an image but a folder",
        "gone.png": "broken symbolic link",
        "empty": "folder holds no image files",
        "nope": "no such file or folder",
    }


def test_image_size_reads_headers_only(tmp_path: Path) -> None:
    """A PNG header claiming 30000 x 30000 is measured without decoding (the file is
    tiny and its data truncated); empty and non-image files raise ValueError."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", b"\x78\x9c")  # the data cut short
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    assert image_size(tmp_path / "huge.png") == (30000, 30000)
    assert image_size(write_png(tmp_path / "a.png", _gradient(48, 80))) == (48, 80)
    assert image_size(_testdata("RG1_UNCI.dcm")) == (1955, 1841)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        image_size(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        image_size(tmp_path / "text.png")


# --- prepare ----------------------------------------------------------------------------


def test_prepare_reference_protocol_on_rg1(rg1: np.ndarray) -> None:
    lr, hr = prepare(rg1)
    assert hr is not None
    assert lr.shape == (64, 64) and hr.shape == (256, 256)
    assert lr.dtype == np.float32 and hr.dtype == np.float32
    assert hr.min() >= 0.0 and hr.max() <= 1.0
    np.testing.assert_array_equal(lr, area_downsample(hr, 4))
    np.testing.assert_array_equal(make_lr(hr), lr)
    # The resize keeps the image's overall brightness (it is an average, not a sample).
    crop = rg1[57 : 57 + 1841, :]
    assert abs(float(hr.mean()) - float(crop.mean())) < 0.01


def test_prepare_takes_64x64_as_lr() -> None:
    x = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    lr, hr = prepare(x)
    assert hr is None
    np.testing.assert_array_equal(lr, x)
    lr2, hr2 = prepare(x, lr_as_is=True)
    assert hr2 is None and lr2.shape == (64, 64)


def test_prepare_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="64x64"):
        prepare(np.zeros((300, 300), np.float32), lr_as_is=True)
    with pytest.raises(ValueError, match="at least 256"):
        prepare(np.zeros((100, 120), np.float32))
    with pytest.raises(ValueError, match="shape"):
        prepare(np.zeros((2, 300, 300), np.float32))


def test_to_reference_hr_crops_centre_and_keeps_constants() -> None:
    x = np.full((512, 700), 0.3, np.float32)
    np.testing.assert_allclose(to_reference_hr(x), 0.3, atol=1e-5)
    # A non-square image is centre-cropped: bright side bands outside the square vanish.
    y = np.zeros((512, 700), np.float32)
    y[:, :94] = 1.0
    y[:, -94:] = 1.0
    assert to_reference_hr(y).max() < 1e-5
    assert to_reference_hr(np.full((256, 256), 0.5, np.float32)).shape == (256, 256)
