"""client.dicom: derived instances (UIDs, references, geometry, pixels, dciodvfy) and the domain.

Sources: a small copy of the bundled radiograph (RG1_UNCI: CR, MONOCHROME1, 15-bit, window,
zero Pixel Spacing) and synthetic low-resolution CR/DX images (MONOCHROME1 and 2, 8/12/16
bits, with and without spacing, window and rescale). ``dciodvfy`` (dicom3tools) checks
that a derived instance has no error its source did not already have.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_sr.client.dicom import (
    SERIES_NUMBER_OFFSET,
    derive_instance,
    derived_uids,
    domain_problem,
    safe_name,
)
from cxr_sr.client.io import dataset_image, read_image
from cxr_sr.client.triton import ModelIdentity
from cxr_sr.imaging import bicubic_baseline

MODEL = ModelIdentity("tiny", "0.1.0", "ab" * 32)
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def rg1_small(step: int = 24) -> pydicom.Dataset:
    """RG1_UNCI with every ``step``-th pixel (82x77 at 24): all its tags, a small image."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    ds = pydicom.dcmread(path)
    arr = np.ascontiguousarray(ds.pixel_array[::step, ::step])
    small = copy.deepcopy(ds)
    small.Rows, small.Columns = arr.shape
    small.PixelData = arr.astype(np.uint16).tobytes()
    return small


def synthetic(
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    spacing: bool = True,
    window: bool = True,
    rescale: bool = False,
    shape: tuple[int, int] = (24, 20),
) -> pydicom.Dataset:
    """A low-resolution DX image of a chest (a smooth gradient with a bright blob)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    x = 0.2 + 0.5 * xx / shape[1] + 0.3 * np.exp(-((yy - 10) ** 2 + (xx - 8) ** 2) / 30)
    full = 2**bits - 1
    pixels = np.rint(np.clip(x, 0, 1) * full).astype(np.uint8 if bits == 8 else np.uint16)
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN1"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.AccessionNumber = "A1"
    ds.StudyID = "S1"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.Modality = "DX"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 2
    ds.Manufacturer = "Synthetic"
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["P", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if spacing:
        ds.PixelSpacing = [0.4, 0.5]
        ds.ImagerPixelSpacing = [0.44, 0.55]
    if window:
        ds.WindowCenter = full * 0.55
        ds.WindowWidth = full * 0.7
    if rescale:
        ds.RescaleIntercept = -100
        ds.RescaleSlope = 2
        ds.RescaleType = "US"
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _sr(source: pydicom.Dataset) -> np.ndarray:
    """A stand-in SR: bicubic 4x of the source as read, clipped to [0, 1]."""
    return np.clip(bicubic_baseline(dataset_image(source)), 0.0, 1.0)


def _errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines() if "Error" in line}


SOURCES = {
    "rg1": rg1_small,
    "m2-12bit-window-spacing": lambda: synthetic("MONOCHROME2", 12),
    "m1-16bit-window-rescale": lambda: synthetic("MONOCHROME1", 16, rescale=True),
    "m2-8bit-no-window-no-spacing": lambda: synthetic("MONOCHROME2", 8, False, False),
    "m1-12bit-no-window": lambda: synthetic("MONOCHROME1", 12, window=False),
    "m2-16bit-no-spacing": lambda: synthetic("MONOCHROME2", 16, spacing=False),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_derived_instance_validates_and_keeps_the_display(name: str, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not installed (dicom3tools, system-packages.txt)")
    source = SOURCES[name]()
    sr = _sr(source)
    derived = derive_instance(source, sr, MODEL)
    src_path, out_path = tmp_path / "source.dcm", tmp_path / "derived.dcm"
    source.save_as(src_path, enforce_file_format=True)
    derived.save_as(out_path, enforce_file_format=True)
    new_errors = _errors(out_path) - _errors(src_path)
    assert not new_errors, f"dciodvfy errors the source did not have: {sorted(new_errors)}"

    back = pydicom.dcmread(out_path)
    assert (back.Rows, back.Columns) == (4 * source.Rows, 4 * source.Columns)
    # same stored-value space: photometric, bits, window, rescale carried over
    assert back.PhotometricInterpretation == source.PhotometricInterpretation
    assert back.BitsStored == source.BitsStored and back.BitsAllocated == source.BitsAllocated
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in source:
            assert float(back[keyword].value) == pytest.approx(float(source[keyword].value))
    # read the way every input is read, the derived image is the SR within one stored level
    levels = float(back.WindowWidth) / float(back.get("RescaleSlope", 1))
    np.testing.assert_allclose(read_image(out_path), sr, atol=0.5 / (levels - 1) + 1e-6)


def test_derived_instance_attributes(tmp_path: Path) -> None:
    source = synthetic("MONOCHROME2", 12)
    derived = derive_instance(source, _sr(source), MODEL, sampling={"steps": 2, "seed": 1})
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                    "AccessionNumber", "StudyID", "StudyDate"):  # fmt: skip
        assert str(derived[keyword].value) == str(source[keyword].value), keyword
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.SOPInstanceUID != source.SOPInstanceUID
    assert derived.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert list(derived.ImageType) == ["DERIVED", "SECONDARY"]
    assert derived.SeriesNumber == 3 + SERIES_NUMBER_OFFSET and derived.InstanceNumber == 2
    assert (
        "NOT FOR DIAGNOSTIC USE" in derived.SeriesDescription and "AI" in derived.SeriesDescription
    )
    assert len(derived.SeriesDescription) <= 64
    (ref,) = derived.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == DX
    (purpose,) = ref.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    (code,) = derived.DerivationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "113085", "DCM", "Spatial resampling")  # fmt: skip
    assert MODEL.version in derived.DerivationDescription
    assert MODEL.weights_sha256 in derived.DerivationDescription
    assert "steps=2" in derived.DerivationDescription
    assert [float(v) for v in derived.PixelSpacing] == pytest.approx([0.1, 0.125])
    assert [float(v) for v in derived.ImagerPixelSpacing] == pytest.approx([0.11, 0.1375])
    assert list(derived.PatientOrientation) == ["P", "F"]
    equipment = {e.Manufacturer: e for e in derived.ContributingEquipmentSequence}
    ours = equipment["cxr-sr"]
    versions = list(ours.SoftwareVersions)
    assert versions[0].startswith("cxr-sr ") and versions[1] == "tiny 0.1.0"
    assert versions[2] == MODEL.weights_sha256
    assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # processing
    assert "Synthetic" in equipment  # the acquisition equipment of the source


def test_derived_uids_are_deterministic_per_source_and_model() -> None:
    source = synthetic()
    a = derive_instance(source, _sr(source), MODEL)
    b = derive_instance(source, _sr(source) * 0.5, MODEL)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == derived_uids(source, MODEL)
    assert a.SOPInstanceUID.startswith("2.25.") and len(a.SOPInstanceUID) <= 64
    other = ModelIdentity("tiny", "0.1.0", "cd" * 32)
    assert derived_uids(source, other)[1] != a.SOPInstanceUID
    newer = ModelIdentity("tiny", "0.2.0", MODEL.weights_sha256)
    assert derived_uids(source, newer)[1] != a.SOPInstanceUID
    sibling = copy.deepcopy(source)
    sibling.SOPInstanceUID = generate_uid()  # same series: same derived series, new instance
    s_series, s_sop = derived_uids(sibling, MODEL)
    assert s_series == a.SeriesInstanceUID and s_sop != a.SOPInstanceUID


def test_derive_instance_rejects_wrong_geometry_and_missing_uids() -> None:
    source = synthetic()
    with pytest.raises(ValueError, match=r"expected \(96, 80\)"):
        derive_instance(source, np.zeros((24, 20)), MODEL)
    with pytest.raises(ValueError, match="NaN"):
        derive_instance(source, np.full((96, 80), np.nan), MODEL)
    del source.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        derive_instance(source, np.zeros((96, 80)), MODEL)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"Modality": "CR"}, None),
        ({"BodyPartExamined": ""}, None),
        ({"BodyPartExamined": "THORAX"}, None),
        ({"Modality": "CT"}, "modality CT"),
        ({"Modality": "OT"}, "modality OT"),
        ({"Modality": ""}, "modality none"),
        ({"BodyPartExamined": "KNEE"}, "KNEE, not chest"),
    ],
)
def test_domain_problem(changes: dict, reason: str | None) -> None:
    ds = synthetic()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    problem = domain_problem(ds)
    assert problem is None if reason is None else reason in problem


def test_derived_instance_is_out_of_domain() -> None:
    """A derived SC fed back in is refused, not super-resolved twice."""
    source = synthetic()
    assert domain_problem(derive_instance(source, _sr(source), MODEL)) is not None


def test_safe_name() -> None:
    assert safe_name("1.2.840.5") == "1.2.840.5"
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("Doe^Jane / Ünïcode") == "Doe_Jane____n_code"
    assert safe_name("..", "x") == "x" and safe_name("") == "instance"
    assert len(safe_name("9" * 200)) == 64


def test_model_identity_hashes_the_weights_stably(checkpoint, tmp_path: Path) -> None:
    from cxr_sr.builders.build import model_identity

    ident = model_identity(checkpoint)
    assert ident.name == checkpoint.name and len(ident.weights_sha256) == 64
    copy_ = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy_)
    (copy_ / "MODEL_CARD.md").write_text("documentation does not change the weights\n")
    assert model_identity(copy_) == ident  # a copy elsewhere is the same model
    weights = next(copy_.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_identity(copy_).weights_sha256 != ident.weights_sha256


def test_served_identity_and_upscale_dataset(server, checkpoint, tmp_path: Path) -> None:
    """The server publishes the checkpoint's identity; ``upscale_dataset`` gives the derived
    instance of the served SR at the source's own geometry."""
    from cxr_sr.builders.build import model_identity
    from cxr_sr.client.dicom import upscale_dataset
    from cxr_sr.client.triton import SRClient

    source = rg1_small(40)  # 49x47: one request on the tiny server (sides up to 128)
    with SRClient(server.http_url) as c:
        ident = c.model_identity()
        derived = upscale_dataset(c, source, steps=2, seed=3)
        want = c.upscale(dataset_image(source), steps=2, seed=3)
    assert ident == model_identity(checkpoint)
    path = tmp_path / "derived.dcm"
    derived.save_as(path, enforce_file_format=True)
    assert (derived.Rows, derived.Columns) == (196, 188)
    assert ident.weights_sha256 in derived.DerivationDescription
    assert "seed=3" in derived.DerivationDescription
    np.testing.assert_allclose(read_image(path), np.clip(want, 0, 1), atol=0.5 / 29999 + 1e-6)


def test_cli_dicom_outputs_of_other_sources_validate(server, tmp_path: Path) -> None:
    """Low-resolution DICOMs of other kinds (MONOCHROME1 8-bit, MONOCHROME2 16-bit with
    rescale, with Pixel and Imager Pixel Spacing) through ``cxr-sr --dicom``: 4x, spacing / 4,
    same study, source referenced, no dciodvfy error their source did not have."""
    from cxr_sr.client.cli import main

    sources = {
        "m1_8bit": synthetic("MONOCHROME1", 8),
        "m2_16bit": synthetic("MONOCHROME2", 16, rescale=True, shape=(30, 17)),
    }
    for name, ds in sources.items():
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    args = [*(str(tmp_path / f"{n}.dcm") for n in sources), "--out", str(out), "--url",
            server.http_url, "--dicom", "--no-png", "--quiet"]  # fmt: skip
    assert main(args) == 0
    for name, source in sources.items():
        path = out / f"{name}_sr.dcm"
        derived = pydicom.dcmread(path)
        assert (derived.Rows, derived.Columns) == (4 * source.Rows, 4 * source.Columns)
        assert derived.StudyInstanceUID == source.StudyInstanceUID
        assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert [float(v) for v in derived.PixelSpacing] == pytest.approx([0.1, 0.125])
        assert [float(v) for v in derived.ImagerPixelSpacing] == pytest.approx([0.11, 0.1375])
        assert derived.PhotometricInterpretation == source.PhotometricInterpretation
        new_errors = _errors(path) - _errors(tmp_path / f"{name}.dcm")
        assert not new_errors, f"{name}: {sorted(new_errors)}"
    assert not list(out.glob("*.png"))  # --no-png
