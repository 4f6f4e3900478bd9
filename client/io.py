"""Reading radiographs into [0, 1] float images and writing results.

``read_image`` is the one entry point for every input the service accepts: PNG (8/16-bit),
JPEG, TIFF (8/16-bit) and BMP through Pillow, and DICOM through pydicom. Every reader
returns a float32 ``[H, W]`` array in [0, 1] with bone bright (MONOCHROME2 convention).

Intensity conventions (how stored values become [0, 1]):

- integer Pillow images are divided by their container's full scale (255 for 8-bit,
  65535 for 16-bit), so a 12-bit image stored in a 16-bit PNG stays dim, as a viewer
  would show it; 32-bit integer / float images outside [0, 1] are min/max normalized;
- colour images become gray with the ITU-R BT.601 luma weights (0.299, 0.587, 0.114);
- DICOM follows the display pipeline of PS3.3 C.11: Modality LUT (rescale slope and
  intercept or a LUT), then the VOI LUT or window (first one when several are given),
  normalized by the output range of that VOI transform; without VOI data the stored range
  (min/max) is used. MONOCHROME1 images are inverted afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
KNOWN_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES

# Transfer syntaxes whose pixel data need a decoder plugin, and the package that brings it.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",  # JPEG-LS near-lossless
}

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def is_dicom(path: str | os.PathLike) -> bool:
    """True when ``path`` has a DICOM suffix or the 'DICM' magic after the 128-byte preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one radiograph as float32 ``[H, W]`` in [0, 1], bone bright.

    Raises ``ValueError`` (naming the file and the reason) for missing, unreadable or
    unsupported files, including a DICOM whose compressed pixel data has no decoder.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    image = _read_dicom(path) if is_dicom(path) else _read_pillow(path)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"{path}: expected a 2-D image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError(f"{path}: image contains NaN or infinite values")
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def image_bits(path: str | os.PathLike) -> int:
    """Bits per sample to write a result of this input with: 8 for 8-bit images (PNG, JPEG,
    BMP, 8-bit TIFF, palette and colour images), 16 for anything deeper (16-bit PNG/TIFF,
    32-bit integer or float images, DICOM). Raises ``ValueError`` like ``read_image``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if is_dicom(path):
        return 16
    try:
        with Image.open(path) as im:
            mode = im.mode
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    return 16 if mode.startswith("I") or mode == "F" else 8


def _minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im) or im
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    return _pillow_to_gray(im, path)


def _pillow_to_gray(im, path: Path) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float64) / 65535.0
    if mode in ("I", "F"):
        x = np.asarray(im).astype(np.float64)
        if mode == "I" and x.min() >= 0 and x.max() <= 65535:
            # 16-bit data that Pillow widened to 32-bit ints (some PNG/TIFF variants).
            return x / (255.0 if x.max() <= 255 else 65535.0)
        if mode == "F" and x.min() >= 0 and x.max() <= 1:
            return x
        return _minmax(x)
    if mode == "L":
        return np.asarray(im).astype(np.float64) / 255.0
    if mode in ("LA", "La"):
        return np.asarray(im.getchannel(0)).astype(np.float64) / 255.0
    if mode in ("1", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(im.convert("RGB")).astype(np.float64) / 255.0
        return rgb @ _LUMA
    raise ValueError(f"{path}: unsupported Pillow image mode {mode!r}")


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable DICOM file ({e})") from e
    return dataset_image(ds, str(path))


def stored_pixels(ds, name: str = "dataset") -> np.ndarray:
    """The stored values of a DICOM dataset's image, ``[H, W]`` (monochrome) or ``[H, W, 3]``
    (colour, as pydicom hands it out: RGB); the first frame of a multi-frame image.

    Raises ``ValueError`` naming ``name`` when there is no pixel data or it cannot be decoded
    (with the decoder package to install, where one would help).
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ValueError(f"{name}: DICOM file has no pixel data")
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError
        package = _DECODER_PACKAGES.get(syntax)
        hint = f"; install the '{package}' package to decode it" if package else ""
        raise ValueError(
            f"{name}: cannot decode DICOM pixel data (transfer syntax {syntax or 'unknown'})"
            f"{hint} ({e})"
        ) from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # multi-frame: the first frame is the image
    return arr


def dataset_image(ds, name: str = "dataset") -> np.ndarray:
    """A DICOM dataset's image as ``read_image`` gives it: float64 ``[H, W]`` in [0, 1], bone
    bright (the module's DICOM conventions). ``ValueError`` like :func:`stored_pixels`."""
    arr = stored_pixels(ds, name)
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        # pydicom hands out RGB (it converts YBR by default).
        return _minmax(arr[..., :3].astype(np.float64) @ _LUMA)
    return display_values(ds, arr)


def display_values(ds, stored: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """PS3.3 C.11 display pipeline of a monochrome dataset: stored values -> [0, 1], bone bright.

    Modality LUT, then the (first) VOI LUT or window normalized by its output range, else the
    min/max of the modality values of ``reference`` (default ``stored`` itself: the image's own
    range); MONOCHROME1 is inverted. ``stored`` may be any array of stored values, e.g. every
    code a bit depth allows, to tabulate the mapping (``client.dicom`` inverts it that way).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    x = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds and np.issubdtype(x.dtype, np.floating) and np.all(x == np.rint(x)):
        x = x.astype(np.int64)  # a VOI LUT is indexed by integers
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    out = None
    if has_voi:
        try:
            lo, hi = _voi_output_range(ds, x)
            y = apply_voi_lut(x, ds, prefer_lut=True).astype(np.float64)
            out = (y - lo) / (hi - lo) if hi > lo else _minmax(y)
        except (ValueError, IndexError, TypeError, AttributeError):
            out = None  # malformed VOI attributes: fall back to min/max
    if out is None:
        ref = x if reference is None else apply_modality_lut(reference, ds)
        lo, hi = float(np.min(ref)), float(np.max(ref))
        out = (x.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(x.shape)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def _voi_output_range(ds, x: np.ndarray) -> tuple[float, float]:
    """Output range of the dataset's VOI transform, found by sending it the extremes.

    A window maps everything below / above it to pydicom's ``y_min`` / ``y_max`` and a VOI
    LUT clamps to its first / last entries, so the transform of values far outside the data
    gives the range to normalize by without re-deriving pydicom's bit-depth rules.
    """
    from pydicom.pixels import apply_voi_lut

    span = float(x.max() - x.min()) + 1.0
    probe = np.array([float(x.min()) - 1e6 * span, float(x.max()) + 1e6 * span])
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        first = int(item.LUTDescriptor[1])
        n = int(item.LUTDescriptor[0]) or 65536
        probe = np.array([first, first + n - 1], dtype=np.int64)
    y = np.asarray(apply_voi_lut(probe, ds, prefer_lut=True), dtype=np.float64)
    return float(y.min()), float(y.max())


def write_png(path: str | os.PathLike, image: np.ndarray, bits: int = 16) -> Path:
    """Write a [0, 1] image (``[H, W]``, or ``[1, H, W]`` / ``[1, 1, H, W]``) as gray PNG.

    Values are clipped to [0, 1] and rounded to ``bits`` (8 or 16) bits. Returns the path.
    """
    from PIL import Image

    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    x = np.asarray(image, dtype=np.float64)
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"expected a [H, W] image, got shape {np.shape(image)}")
    if not np.isfinite(x).all():
        raise ValueError("image contains NaN or infinite values")
    full = 65535 if bits == 16 else 255
    q = np.rint(np.clip(x, 0.0, 1.0) * full).astype(np.uint16 if bits == 16 else np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(q).save(path, format="PNG")
    return path


def iter_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a list of image files.

    A file given explicitly is kept whatever its suffix (``read_image`` decides later).
    A folder is searched recursively, in sorted order, for files with a known suffix
    (``KNOWN_SUFFIXES``) and for DICOM files without suffix (detected by content, as in
    DICOM study folders); hidden files and ``DICOMDIR`` are skipped. Duplicates are dropped.
    Raises ``ValueError`` for a path that does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            candidates = [
                f
                for f in sorted(p.rglob("*"))
                if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and f.name.upper() != "DICOMDIR"
                and (f.suffix.lower() in KNOWN_SUFFIXES or (not f.suffix and is_dicom(f)))
            ]
        elif p.is_file():
            candidates = [p]
        else:
            raise ValueError(f"{p}: no such file or folder")
        for f in candidates:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_COPIED_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "BodyPartExamined",
    "ViewPosition",
    "Laterality",
)


def write_dicom_sc(
    path: str | os.PathLike,
    image: np.ndarray,
    source: str | os.PathLike | None = None,
    *,
    series_uid: str | None = None,
    series_description: str = "4x super-resolution (cxr-sr)",
    instance_number: int = 1,
    pixel_spacing: tuple[float, float] | None = None,
) -> Path:
    """Write a [0, 1] image as a derived Secondary Capture DICOM (16-bit, MONOCHROME2).

    With ``source`` (a DICOM file), patient and study attributes are copied and the source
    image is referenced (SourceImageSequence), so the result files into the same study as a
    new series; give every image of one run the same ``series_uid`` (e.g.
    ``pydicom.uid.generate_uid()``) to group them. ``pixel_spacing`` (row, column mm) is
    written when known. The image is marked DERIVED / SECONDARY, lossy-processed: it is a
    computed estimate, not an acquisition. Returns the path.
    """
    import datetime

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    x = np.asarray(image, dtype=np.float64)
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"expected a finite [H, W] image, got shape {np.shape(image)}")
    pixels = np.rint(np.clip(x, 0.0, 1.0) * 65535).astype(np.uint16)

    ds = Dataset()
    src = None
    if source is not None:
        try:
            src = pydicom.dcmread(source, stop_before_pixels=True)
        except Exception as e:
            raise ValueError(f"{source}: not a readable DICOM file ({e})") from e
        for keyword in _COPIED_FROM_SOURCE:
            if keyword in src:
                setattr(ds, keyword, src[keyword].value)
        if "SOPInstanceUID" in src and "SOPClassUID" in src:
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            ds.SourceImageSequence = [ref]
    now = datetime.datetime.now()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = str(getattr(src, "Modality", "OT")) if src is not None else "OT"
    ds.ConversionType = "WSD"  # workstation
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 9000
    ds.InstanceNumber = int(instance_number)
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "4x super-resolution by a latent diffusion model (cxr-sr)"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01"  # the pixels are an estimate, not the acquisition
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = 32768  # LINEAR window (C.11.2.1.2.1) mapping 0..65535 onto itself
    ds.WindowWidth = 65536
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    ds.PixelData = pixels.tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
