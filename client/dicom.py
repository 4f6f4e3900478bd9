"""Derived DICOM instances of super-resolved radiographs, and what a DICOM input must be.

``derive_instance(source, sr, model)`` makes the 4x result of one source image a new
instance in the source's study, the way PACS and AI pipelines expect a derived image:

- IOD: Secondary Capture Image (``highdicom.sc.SCImage``). Every PACS stores and shows SC,
  and it is what highdicom builds and checks; the modality IODs (CR, DX) describe an
  acquisition (exposure, detector, positioner) that a computed estimate does not have, and
  DX "for presentation" would need those acquisition modules to be re-asserted for pixels
  the detector never measured;
- Series and SOP Instance UIDs are ``2.25.`` UUIDs (name-based, RFC 4122) of the source's
  Series / SOP Instance UID, the model version and the weights hash: a re-run with the same
  model reproduces them, so a re-sent result replaces itself in a PACS instead of
  duplicating, while results of other weights get their own series. Instances derived from
  one source series form one derived series;
- ``ImageType`` DERIVED\\SECONDARY, Source Image Sequence (purpose DCM 121322 "Source image
  for image processing operation"), Derivation Code Sequence (DCM 113085 "Spatial
  resampling") and a Derivation Description naming the model, its version and weights hash;
- Rows/Columns 4x the source, Pixel Spacing and Imager Pixel Spacing / 4 where the source
  gives positive ones;
- pixel values in the source's own stored-value space (same photometric interpretation,
  bits stored, rescale and window/VOI LUT), found by inverting the display pipeline
  ``client.io`` reads it with. The window is in modality units, which resampling does not
  change, so the source's window shows the derived image with the same contrast, and a
  MONOCHROME1 source stays MONOCHROME1 (its window still means "bone bright" after the
  viewer's inversion). The model only saw the windowed range (values outside it were
  clipped when the image was read), so the derived values span that range. A source
  without VOI data gets the window its own min/max implied; sources this cannot be done for
  (colour, signed, non-monotone VOI LUT) are written in display space, with the same
  photometric interpretation and a window covering the full range;
- patient and study identity kept; Series Description "AI ... NOT FOR DIAGNOSTIC USE";
  Contributing Equipment Sequence with the source's acquisition equipment and this software
  (version, model name, version and weights hash in Software Versions: IHE AI Results);
  Patient Orientation (Type 2C) copied, empty when the source has none.

``domain_problem(ds)`` says why a dataset is outside the model's domain (chest radiographs);
``upscale_dataset(client, ds)`` reads, upscales and derives one dataset.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import uuid
import warnings
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DS

from cxr_sr.client.io import dataset_image, display_values, stored_pixels
from cxr_sr.client.triton import ModelIdentity, SRClient
from cxr_sr.imaging import SCALE

SOFTWARE = "cxr-sr"
SERIES_DESCRIPTION = f"AI {SCALE}x super-resolution, NOT FOR DIAGNOSTIC USE"  # LO: <= 64
SERIES_NUMBER_OFFSET = 9000  # derived series number = source series number + this
# Modalities of projection radiographs: computed, digital and (digitized) film radiography.
DOMAIN_MODALITIES = ("CR", "DX", "RG")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")  # BodyPartExamined values (defined and seen)
# Namespace of the derived UIDs: uuid5(this, source UID | model version | weights hash).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cxr-sr:derived-dicom")
_VOI_ATTRIBUTES = (
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "WindowCenterWidthExplanation",
    "VOILUTSequence",
)
_MODALITY_LUT_ATTRIBUTES = (
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
)
_COPIED = (
    "StudyDescription",
    "PatientAge",
    "IssuerOfPatientID",
    "TimezoneOffsetFromUTC",
    "BodyPartExamined",
    "ViewPosition",
    "BurnedInAnnotation",
    "PixelSpacingCalibrationType",
    "PixelSpacingCalibrationDescription",
)
_LOSSY = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")


def derived_uid(*parts: str) -> str:
    """A ``2.25.`` UID that is a fixed function of ``parts`` (a name-based UUID, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def derived_uids(source: pydicom.Dataset, model: ModelIdentity) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the instance derived from ``source`` by
    ``model``: the same for the same source and model, whatever else changes."""
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID"):
        if not str(source.get(keyword, "")):
            raise ValueError(f"the source has no {keyword}: cannot reference it")
    key = (model.version, model.weights_sha256)
    return (
        derived_uid("series", str(source.SeriesInstanceUID), *key),
        derived_uid("instance", str(source.SOPInstanceUID), *key),
    )


def domain_problem(ds: pydicom.Dataset) -> str | None:
    """Why ``ds`` is outside the model's domain (projection chest radiographs), or None.

    Refused: a modality other than :data:`DOMAIN_MODALITIES` (CT, MR, US, OT, our own
    derived SC ...), and a Body Part Examined that is present and not chest. Callers skip
    such inputs with this reason unless the user forces them.
    """
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in DOMAIN_MODALITIES:
        shown = modality or "none"
        return (
            f"modality {shown} is not a projection radiograph ({', '.join(DOMAIN_MODALITIES)}): "
            "the model was trained on chest radiographs"
        )
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part and not any(chest in part for chest in CHEST_BODY_PARTS):
        return (
            f"body part examined is {part}, not chest: the model was trained on chest radiographs"
        )
    return None


def _spacing(value: Any) -> list[DS] | None:
    """``value`` (a 2-value spacing) divided by the scale, or None when absent or not positive."""
    try:
        pair = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or min(pair) <= 0:
        return None
    return [DS(v / SCALE, auto_format=True) for v in pair]


def _orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when highdicom's enumerations accept it."""
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    try:
        return tuple(hd.PatientOrientationValuesBiped(str(v)).value for v in value)
    except ValueError:
        return None


def _window(lo: float, hi: float) -> tuple[DS, DS]:
    """A LINEAR window (PS3.3 C.11.2.1.2.1) mapping ``lo`` to the bottom and ``hi`` to the
    top of the output range: width hi - lo + 1, centre (lo + hi + 1) / 2."""
    return DS((lo + hi + 1) / 2, auto_format=True), DS(hi - lo + 1, auto_format=True)


_GRID = 2**20  # display levels of the inverse lookup (a step of 1e-6: finer than any code)


def _invert(table: np.ndarray, codes_: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """Stored codes whose display value (``table``, monotone over ``codes_``) is nearest to
    each of ``values`` (in [0, 1]); None when the table is not monotone.

    The nearest code is tabulated once for :data:`_GRID` display levels and looked up per
    pixel, so a 7820 x 7364 image costs one gather, not a search per pixel."""
    step = np.diff(table)
    if np.all(step <= 0):
        table, codes_ = table[::-1], codes_[::-1]
    elif not np.all(step >= 0):
        return None
    grid = np.linspace(0.0, 1.0, _GRID)
    i = np.clip(np.searchsorted(table, grid), 1, len(table) - 1)
    below = np.abs(grid - table[i - 1]) <= np.abs(table[i] - grid)
    lookup = codes_[np.where(below, i - 1, i)]
    return lookup[np.rint(values * np.float32(_GRID - 1)).astype(np.int32)]


def _encode(source: pydicom.Dataset, sr: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values of ``sr`` (display values in [0, 1], bone bright) for the derived image,
    and the Image Pixel / Modality LUT / VOI LUT attributes they go with (module docstring)."""
    photometric = str(source.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    monochrome = photometric in ("MONOCHROME1", "MONOCHROME2")
    bits = int(source.get("BitsStored", 8) or 8)
    signed = int(source.get("PixelRepresentation", 0) or 0) == 1
    values = np.clip(np.asarray(sr, dtype=np.float32), 0.0, 1.0)
    if monochrome and not signed and 1 < bits <= 16:
        reference = stored_pixels(source) if "PixelData" in source else None
        codes_ = np.arange(2**bits)
        table = np.clip(display_values(source, codes_, reference=reference), 0.0, 1.0)
        stored = _invert(table, codes_, values)
        if stored is not None:
            attrs = {
                k: source[k].value
                for k in (*_MODALITY_LUT_ATTRIBUTES, *_VOI_ATTRIBUTES)
                if k in source
            }
            has_voi = "VOILUTSequence" in source or {"WindowCenter", "WindowWidth"} <= set(attrs)
            if not has_voi:  # the window the source's own range implied (min/max reading)
                ends = reference if reference is not None else codes_
                ends = apply_modality_lut(np.array([ends.min(), ends.max()]), source)
                attrs["WindowCenter"], attrs["WindowWidth"] = _window(*map(float, ends))
            return _pixels(stored, bits), {"PhotometricInterpretation": photometric, **attrs}
    # display space: v -> round(v * (2^bits - 1)), inverted for MONOCHROME1
    bits = min(max(bits, 8), 16)
    codes_ = np.rint(values * (2**bits - 1))
    if photometric == "MONOCHROME1":
        codes_ = 2**bits - 1 - codes_
    centre, width = _window(0, 2**bits - 1)
    attrs = {
        "PhotometricInterpretation": photometric if monochrome else "MONOCHROME2",
        "WindowCenter": centre,
        "WindowWidth": width,
    }
    return _pixels(codes_, bits), attrs


def _pixels(stored: np.ndarray, bits: int) -> np.ndarray:
    return stored.astype(np.uint8 if bits <= 8 else np.uint16)


def _software_versions(model: ModelIdentity) -> list[str]:
    """Software Versions values (LO, 64 characters each): this package, the model, its hash."""
    package = importlib.metadata.version("cxr-sr")
    return [
        f"{SOFTWARE} {package}"[:64],
        f"{model.name} {model.version}"[:64],
        model.weights_sha256[:64],
    ]


def derive_instance(
    source: pydicom.Dataset,
    sr: np.ndarray,
    model: ModelIdentity,
    *,
    series_number: int | None = None,
    instance_number: int | None = None,
    series_description: str = SERIES_DESCRIPTION,
    sampling: dict[str, Any] | None = None,
) -> pydicom.Dataset:
    """The derived Secondary Capture instance of ``source`` whose image is ``sr``.

    Args:
        source: the DICOM image the SR was made from (with its pixel data where it has no
            VOI attributes: its range sets the derived window).
        sr: float ``[4 * Rows, 4 * Columns]`` in [0, 1], bone bright (``SRClient.upscale``
            of ``client.io.dataset_image(source)``).
        model: the model that made it (``SRClient.model_identity()``).
        series_number: default the source's Series Number + :data:`SERIES_NUMBER_OFFSET`.
        instance_number: default the source's Instance Number (else 1).
        series_description: LO, at most 64 characters.
        sampling: the request's sampling controls, recorded in the Derivation Description.

    Returns the dataset (file meta included, Explicit VR Little Endian); see the module
    docstring for what it carries. Raises ``ValueError`` when ``sr`` is not 4x the source
    or the source lacks the UIDs a reference needs.
    """
    rows, cols = int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)
    x = np.asarray(sr)
    if x.shape != (SCALE * rows, SCALE * cols):
        raise ValueError(
            f"sr has shape {x.shape}; the source is {rows}x{cols}, so expected "
            f"({SCALE * rows}, {SCALE * cols})"
        )
    if not np.isfinite(x).all():
        raise ValueError("sr contains NaN or infinite values")
    if len(series_description) > 64:
        raise ValueError(f"series_description is {len(series_description)} characters; at most 64")
    series_uid, sop_uid = derived_uids(source, model)
    pixels, pixel_attrs = _encode(source, x)
    if series_number is None:
        series_number = int(source.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
    if instance_number is None:
        instance_number = int(source.get("InstanceNumber", 1) or 1)
    orientation = _orientation(source)
    ours = hd.ContributingEquipment(
        manufacturer=SOFTWARE,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{SOFTWARE} {model.name}"[:64],
        software_versions=_software_versions(model),
        contribution_description=f"AI {SCALE}x super-resolution (latent diffusion), "
        f"model {model.name} {model.version}, weights sha256 {model.weights_sha256}",
    )
    with warnings.catch_warnings():
        # a source's one-component person name (e.g. "ward") is its own, kept as it is
        warnings.filterwarnings("ignore", "The string .* unlikely to represent", UserWarning)
        ds = _sc_image(
            source,
            pixels=pixels,
            photometric=pixel_attrs.pop("PhotometricInterpretation"),
            model=model,
            equipment=ours,
            uids=(series_uid, sop_uid),
            numbers=(series_number, instance_number),
            series_description=series_description,
            orientation=orientation,
        )
    # Patient Orientation (Type 2C): the source's as it is, or empty when it has none
    ds.PatientOrientation = (
        source.get("PatientOrientation", "") if orientation is None else list(orientation)
    )
    bits = int(source.get("BitsStored", 0) or 0)
    if pixels.dtype == np.uint16 and 8 < bits < 16 and pixels.max() < 2**bits:
        ds.BitsStored, ds.HighBit = bits, bits - 1
    for keyword, value in pixel_attrs.items():
        setattr(ds, keyword, value)
    for keyword in _COPIED:
        if keyword in source and keyword not in ds:
            ds[keyword] = source[keyword]
    if str(source.get("LossyImageCompression", "")) == "01":  # once lossy, always lossy
        for keyword in _LOSSY:
            if keyword in source:
                ds[keyword] = source[keyword]
    spacing = _spacing(source.get("ImagerPixelSpacing"))
    if spacing is not None:
        ds.ImagerPixelSpacing = spacing
    ds.ImageType = ["DERIVED", "SECONDARY"]
    now = datetime.datetime.now()
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.DerivationDescription = _description(model, sampling)
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    ds.SourceImageSequence = [ref]
    ds.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(codes.DCM.SpatialResampling)]
    return ds


def _sc_image(
    source: pydicom.Dataset,
    *,
    pixels: np.ndarray,
    photometric: str,
    model: ModelIdentity,
    equipment: hd.ContributingEquipment,
    uids: tuple[str, str],
    numbers: tuple[int, int],
    series_description: str,
    orientation: tuple[str, str] | None,
) -> hd.sc.SCImage:
    """highdicom's Secondary Capture of ``pixels`` with the source's patient and study."""
    laterality = str(source.get("Laterality", "") or "")
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=photometric,
        bits_allocated=8 if pixels.dtype == np.uint8 else 16,
        coordinate_system="PATIENT",
        series_instance_uid=uids[0],
        series_number=numbers[0],
        sop_instance_uid=uids[1],
        instance_number=numbers[1],
        manufacturer=SOFTWARE,
        manufacturer_model_name=f"{SOFTWARE} {model.name}"[:64],
        software_versions=_software_versions(model),
        pixel_spacing=_spacing(source.get("PixelSpacing")),
        laterality=laterality if laterality in ("R", "L") else None,
        # highdicom wants an orientation for patient-based images; the source's is set below
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[equipment],
        series_description=series_description,
    )


def _description(model: ModelIdentity, sampling: dict[str, Any] | None) -> str:
    """Derivation Description (ST, at most 1024 characters)."""
    text = (
        f"{SCALE}x super-resolution by {SOFTWARE} (latent diffusion), model {model.name} "
        f"version {model.version}, weights sha256 {model.weights_sha256}"
    )
    if sampling:
        text += "; sampling " + ", ".join(f"{k}={v}" for k, v in sorted(sampling.items()))
    return text[:1024]


def upscale_dataset(
    client: SRClient,
    ds: pydicom.Dataset,
    model: ModelIdentity | None = None,
    *,
    overlap: int | None = None,
    tile: int | None = None,
    progress=None,
    derive: dict[str, Any] | None = None,
    **sampling: Any,
) -> pydicom.Dataset:
    """Read ``ds``'s image as ``client.io`` does, upscale it at its own geometry through
    ``client`` (tiled where larger than the server takes) and return the derived instance.

    ``model`` defaults to ``client.model_identity()``; ``derive`` holds keyword arguments
    of :func:`derive_instance` (series number, description); ``overlap``, ``tile``,
    ``progress`` and the sampling keywords go to ``SRClient.upscale``. Raises ``ValueError``
    for a dataset whose pixels cannot be read and the client's errors for server failures.
    The domain is not checked here (:func:`domain_problem`).
    """
    image = dataset_image(ds, str(ds.get("SOPInstanceUID", "dataset")))
    sr = client.upscale(image, overlap=overlap, tile=tile, progress=progress, **sampling)
    model = model or client.model_identity()
    given = {k: v for k, v in sampling.items() if v is not None}
    return derive_instance(ds, sr, model, sampling=given, **(derive or {}))


def safe_name(text: str, fallback: str = "instance") -> str:
    """A file name stem from free text: letters, digits, ``.``, ``-`` and ``_`` only, at most
    64 characters, never empty, hidden or ``..`` (tag values never reach the file system raw)."""
    kept = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in text)
    kept = kept.strip("._")[:64]
    return kept or fallback


def dicom_file_name(ds: pydicom.Dataset) -> str:
    """``<SOP Instance UID>.dcm`` with the UID sanitized (:func:`safe_name`)."""
    return f"{safe_name(str(ds.get('SOPInstanceUID', '')))}.dcm"
