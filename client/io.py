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
import threading
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

_PIL_LIMIT_LOCK = threading.Lock()
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


def _candidate(root: Path, f: Path) -> bool:
    """A folder entry that names an input: not hidden, not DICOMDIR, a known suffix or (for a
    regular file without suffix) DICOM content."""
    if any(part.startswith(".") for part in f.relative_to(root).parts):
        return False
    if f.name.upper() == "DICOMDIR":
        return False
    return f.suffix.lower() in KNOWN_SUFFIXES or (not f.suffix and f.is_file() and is_dicom(f))


def scan_inputs(
    paths: Iterable[str | os.PathLike],
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into image files, and say what cannot be an input.

    Returns ``(files, problems)``. ``files`` as :func:`iter_inputs` gives them. ``problems``
    holds ``(path, reason)`` for a path that does not exist, a folder with no image in it,
    and a folder entry named like an image that is not a readable regular file (a broken
    symbolic link, a folder called ``x.png``, a socket...), so a batch can report each one.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            candidates = []
            known = len(problems)
            for f in sorted(p.rglob("*")):
                if not _candidate(p, f):
                    continue
                if f.is_file():
                    candidates.append(f)
                elif f.is_symlink() and not f.exists():
                    problems.append((f, "broken symbolic link"))
                elif f.suffix.lower() in KNOWN_SUFFIXES:
                    what = "a folder" if f.is_dir() else "not a regular file"
                    problems.append((f, f"named like an image but {what}"))
            if not candidates and len(problems) == known:  # nothing, not even a bad entry
                problems.append((p, "folder holds no image files"))
        elif p.is_file():
            candidates = [p]
        elif p.is_symlink():
            problems.append((p, "broken symbolic link"))
            continue
        else:
            problems.append((p, "no such file or folder"))
            continue
        for f in candidates:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found, problems


def iter_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a list of image files.

    A file given explicitly is kept whatever its suffix (``read_image`` decides later).
    A folder is searched recursively, in sorted order, for files with a known suffix
    (``KNOWN_SUFFIXES``) and for DICOM files without suffix (detected by content, as in
    DICOM study folders); hidden files and ``DICOMDIR`` are skipped. Duplicates are dropped.
    Raises ``ValueError`` for a path that does not exist (:func:`scan_inputs` reports it and
    the other problems instead).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
    return scan_inputs(paths)[0]


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image from its header alone, without decoding the pixels
    (Pillow's lazy open for PNG/JPEG/TIFF/BMP, the DICOM header's Rows and Columns), so a
    caller can refuse a huge image before it takes memory. Raises ``ValueError`` like
    :func:`read_image` for an empty, unreadable or unsupported file."""
    import pydicom
    from PIL import Image, UnidentifiedImageError
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    if is_dicom(path):
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, force=path.suffix.lower() in DICOM_SUFFIXES
            )
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable DICOM file ({e})") from e
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows < 1 or cols < 1:
            raise ValueError(f"{path}: DICOM file has no image (no Rows/Columns)")
        return rows, cols
    # Pillow refuses to open a header past its own bomb limit: lifted while the header is read
    # (nothing is decoded here; the caller applies its own limit before read_image)
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    return height, width
