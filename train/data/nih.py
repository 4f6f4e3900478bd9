"""NIH ChestX-ray14 on its published layout, and plain folders of images or DICOM files.

NIH layout (``root`` is the folder that holds the CSV)::

    <root>/Data_Entry_2017.csv        (or Data_Entry_2017_v2020.csv) one row per image:
                                      "Image Index", "Finding Labels", "Follow-up #",
                                      "Patient ID", "Patient Age", "Patient Gender",
                                      "View Position", ... (only the three quoted in
                                      ``NEEDED_COLUMNS`` are used)
    <root>/train_val_list.txt         official patient-wise split, one file name per line
    <root>/test_list.txt
    <root>/images/*.png               1024 x 1024 8-bit PNGs, either all in one folder
    <root>/images_001/images/*.png    ... or as the release's 12 archives unpack them
    ...
    <root>/images_012/images/*.png

A plain ``<root>/images/`` folder works too: without the CSV the patient is the file name's
first field (``00000075_000.png`` -> patient ``00000075``, as in the release) and no view
filter is possible; without the two lists the split is made by patient from a stable hash.

Splits, with the official lists: ``test`` = the images of ``test_list.txt``; ``train`` and
``val`` divide the patients of ``train_val_list.txt``: a patient goes to ``val`` when a stable
hash of (split_seed, Patient ID) falls below ``val_fraction``. Without the lists, the same
hash sends a patient to ``test`` below ``test_fraction``, to ``val`` below ``test_fraction +
val_fraction``, else to ``train``. Either way no patient is in two splits, and adding images
or changing the sampling seed never moves a patient. Only images present on disk are
used (a partial download works; the number missing is logged). ``n`` images are then drawn
without replacement with ``numpy.random.default_rng(seed)`` from the sorted candidates.

Reference protocol (as the reference project): the whole image resized to ``hr_size``
(anti-aliased), LR = 4x area downsample.
"""

from __future__ import annotations

import csv
import logging
import zlib
from pathlib import Path

import numpy as np

from cxr_sr.client.io import read_image
from cxr_sr.train.data.pairs import (
    SPLITS,
    PairDataset,
    Region,
    random_box,
    reference_hr,
    resize,
)

log = logging.getLogger(__name__)

CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
NEEDED_COLUMNS = ("Image Index", "Patient ID", "View Position")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
VIEW_POSITIONS = ("PA", "AP")

LAYOUT_HELP = (
    "expected the NIH ChestX-ray14 layout: the PNGs in <root>/images/ or "
    "<root>/images_001/images/ ... <root>/images_012/images/, optionally with "
    "<root>/Data_Entry_2017.csv and the official <root>/train_val_list.txt and <root>/test_list.txt"
)


def patient_from_name(name: str) -> str:
    """The Patient ID that ChestX-ray14 encodes in a file name: ``00000075_000.png`` ->
    ``00000075`` (patient id, underscore, follow-up number)."""
    stem = Path(name).stem
    patient = stem.split("_", 1)[0]
    if not patient:
        raise ValueError(f"{name}: cannot read a patient id from this file name")
    return patient


def hash_split(key: str, split_seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of a patient (or, for plain folders, a file) when no official list exists:
    ``test`` below ``test_fraction`` of the stable hash, ``val`` below ``test_fraction +
    val_fraction``, else ``train``."""
    u = stable_fraction(key, split_seed)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def stable_fraction(key: str, salt: int = 0) -> float:
    """A number in [0, 1) fixed by ``(salt, key)``, the same on every machine and run."""
    return zlib.crc32(f"{salt}:{key}".encode()) / 2**32


def sample_names(names: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` of ``names`` drawn without replacement (seeded), in sorted order; all if
    ``n`` is None or >= len(names)."""
    names = sorted(names)
    if n is None or n >= len(names):
        return names
    if n < 1:
        raise ValueError(f"the number of images must be >= 1 or None, got {n}")
    pick = np.random.default_rng(seed).choice(len(names), size=n, replace=False)
    return [names[i] for i in sorted(pick)]


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; {LAYOUT_HELP}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def find_nih_images(root: Path) -> dict[str, Path]:
    """File name -> path for every PNG under ``root/images`` and ``root/images_*/images``."""
    folders = [root / "images"] + sorted(p / "images" for p in root.glob("images_*"))
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                if p.suffix.lower() == ".png":
                    found.setdefault(p.name, p)
    if not found:
        raise ValueError(f"{root}: no PNG images found; {LAYOUT_HELP}")
    return found


def read_nih_table(root: Path) -> list[dict[str, str]] | None:
    """Rows of the Data_Entry CSV (dicts keyed by column name); None without a CSV."""
    for name in CSV_NAMES:
        if (root / name).is_file():
            path = root / name
            break
    else:
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in NEEDED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        reader.fieldnames = header
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def nih_split_names(
    root: str | Path,
    split: str,
    *,
    val_fraction: float,
    split_seed: int,
    view_position: str | None = None,
    test_fraction: float = 0.1,
) -> tuple[list[str], dict[str, Path]]:
    """(sorted image names of ``split`` present on disk, name -> path).

    See the module docstring for how the splits are made; ``test_fraction`` applies only
    when the official lists are absent.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder; {LAYOUT_HELP}")
    if view_position is not None and view_position not in VIEW_POSITIONS:
        raise ValueError(
            f"view_position must be one of {VIEW_POSITIONS} or None, got {view_position!r}"
        )
    table = read_nih_table(root)
    if table is None and view_position is not None:
        raise ValueError(
            f"{root}: view_position={view_position!r} needs {CSV_NAMES[0]}, which is absent"
        )
    rows = {r["Image Index"]: r for r in table} if table is not None else None
    paths = find_nih_images(root)
    official = (root / TEST_LIST).is_file() or (root / TRAIN_VAL_LIST).is_file()
    if official:
        listed = _read_list(root / (TEST_LIST if split == "test" else TRAIN_VAL_LIST))
    else:
        listed = sorted(paths)
    names = []
    for name in listed:
        row = rows.get(name) if rows is not None else {"Patient ID": patient_from_name(name)}
        if row is None:
            continue
        if view_position is not None and row["View Position"] != view_position:
            continue
        patient = row["Patient ID"]
        if not official:
            if hash_split(patient, split_seed, val_fraction, test_fraction) != split:
                continue
        elif split != "test":
            is_val = stable_fraction(patient, split_seed) < val_fraction
            if is_val != (split == "val"):
                continue
        names.append(name)
    present = [n for n in names if n in paths]
    if len(present) < len(names):
        log.warning(
            "NIH %s split: %d of %d listed images are not on disk under %s",
            split,
            len(names) - len(present),
            len(names),
            root,
        )
    if not present:
        raise ValueError(f"{root}: no image of the {split} split found on disk; {LAYOUT_HELP}")
    return sorted(present), paths


class ImageFiles(PairDataset):
    """Pairs from a list of image files, read with ``client.io.read_image``.

    Every item is the reference protocol (the whole image -> ``hr_size``; a non-square image
    is centre-cropped or stretched per ``resize_mode``), unless ``train_crops`` is set: then
    training items are random crops at ``crop_scales`` of the native image, as for the
    bundled sample. ``names`` are paths relative to ``root`` (written into caches).
    """

    def __init__(
        self,
        *,
        root: str | Path,
        names: list[str],
        split: str,
        seed: int,
        hr_size: int,
        scale: int,
        hflip: bool,
        resize_mode: str = "crop",
        train_crops: bool = False,
        crop_scales: list[float] | None = None,
        source: str = "folder",
        keep_decoded: bool = False,
        repeats: int = 1,
    ) -> None:
        super().__init__(split=split, seed=seed, hr_size=hr_size, scale=scale, hflip=hflip)
        if not names:
            raise ValueError(f"{root}: no images for the {split} split")
        if train_crops and not crop_scales:
            raise ValueError("train_crops needs crop_scales")
        self.root = Path(root)
        self.names = list(names)
        self.resize_mode = resize_mode
        self.train_crops = bool(train_crops)
        self.crop_scales = [float(s) for s in crop_scales or []]
        self.source = source
        self.repeats = int(repeats)
        self._decoded: dict[int, np.ndarray] = {}
        if keep_decoded:  # before any loader worker forks, so that they all share it
            for i in range(len(self.names)):
                self._decoded[i] = read_image(self.path(i))
        reference_hr(np.zeros((2, 2), np.float32), 2, resize_mode)  # validates the mode

    def __len__(self) -> int:
        return len(self.names) * self.repeats

    def name(self, index: int) -> str:
        return self.names[index % len(self.names)]

    def path(self, index: int) -> Path:
        return self.root / self.name(index)

    def load_hr(self, index: int, rng: np.random.Generator) -> np.ndarray:
        image = self._decoded.get(index % len(self.names))
        if image is None:
            image = read_image(self.path(index))
        if self.split == "train" and self.train_crops:
            h, w = image.shape
            box = random_box(rng, Region(0, h, 0, w), self.crop_scales, self.hr_size)
            return resize(box.cut(image), self.hr_size)
        return reference_hr(image, self.hr_size, self.resize_mode)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "root": str(self.root),
            "split": self.split,
            "items": len(self),
            "train_crops": self.train_crops,
        }


def nih_dataset(
    root: str | Path,
    split: str,
    *,
    n: int | None,
    seed: int,
    val_fraction: float,
    split_seed: int,
    view_position: str | None,
    test_fraction: float = 0.1,
    **kwargs,
) -> ImageFiles:
    """The NIH ChestX-ray14 pairs of ``split`` (module docstring); ``kwargs`` go to
    ``ImageFiles``."""
    names, paths = nih_split_names(
        root,
        split,
        val_fraction=val_fraction,
        split_seed=split_seed,
        view_position=view_position,
        test_fraction=test_fraction,
    )
    root = Path(root)
    picked = sample_names(names, n, seed)
    rel = [paths[name].relative_to(root).as_posix() for name in picked]
    return ImageFiles(root=root, names=rel, split=split, seed=seed, source="nih", **kwargs)


def _dicom_group(path: Path) -> str:
    """The patient of a DICOM file (PatientID, else StudyInstanceUID, else the file)."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"]
        )
    except Exception:  # an unreadable header is reported when the pixels are read
        return path.as_posix()
    return str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "") or path.as_posix())


def files_dataset(
    root: str | Path,
    split: str,
    *,
    dicom: bool,
    n: int | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    **kwargs,
) -> ImageFiles:
    """Pairs from a folder searched recursively (``client.io.iter_inputs``).

    ``dicom=True`` keeps DICOM files (by suffix or content) and splits patient-wise: a
    patient (PatientID, else study, else file) goes to ``test`` when its stable hash is
    below ``test_fraction``, to ``val`` below ``test_fraction + val_fraction``, else to
    ``train``. ``dicom=False`` keeps the other images (PNG/JPEG/TIFF/BMP), split the same
    way file by file. Then ``n`` files are sampled as for NIH.
    """
    from cxr_sr.client.io import is_dicom, iter_inputs

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    files = [f for f in iter_inputs([root]) if is_dicom(f) == dicom]
    kind = "DICOM files" if dicom else "PNG/JPEG/TIFF images"
    if not files:
        raise ValueError(f"{root}: no {kind} found (searched recursively)")
    names = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        key = _dicom_group(f) if dicom else rel
        if hash_split(key, split_seed, val_fraction, test_fraction) == split:
            names.append(rel)
    if not names:
        raise ValueError(
            f"{root}: none of the {len(files)} {kind} fall in the {split} split "
            f"(val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
    return ImageFiles(
        root=root,
        names=sample_names(names, n, seed),
        split=split,
        seed=seed,
        source="dicom" if dicom else "folder",
        **kwargs,
    )
