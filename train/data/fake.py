"""A small fake NIH ChestX-ray14 tree of phantoms, in the real layout (tests, smoke runs).

    write_fake_nih(root, n_patients=10, images_per_patient=2, size=256, layout="split")

writes 8-bit PNG phantoms named like the release (``00000001_000.png``: patient 1, follow-up
0), ``Data_Entry_2017.csv`` with the real header, and the official-style lists: the last
``n_test_patients`` patients go to ``test_list.txt``, the others to ``train_val_list.txt``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_sr.train.data.phantom import chest_phantom

NIH_HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
]
LAYOUTS = ("flat", "split")


def write_fake_nih(
    root: str | Path,
    *,
    n_patients: int = 10,
    images_per_patient: int = 2,
    n_test_patients: int = 3,
    size: int = 256,
    layout: str = "split",
    seed: int = 0,
) -> list[str]:
    """Write the tree under ``root``; return the image names.

    ``layout="flat"`` puts every PNG in ``root/images/``; ``"split"`` spreads them over
    ``root/images_001/images/``, ``root/images_002/images/``, ... (5 images per folder here;
    the release has about 10,000). View positions alternate PA, AP.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= n_test_patients < n_patients:
        raise ValueError("n_test_patients must be in [0, n_patients)")
    root = Path(root)
    rows, names = [], []
    for p in range(1, n_patients + 1):
        for k in range(images_per_patient):
            name = f"{p:08d}_{k:03d}.png"
            i = len(names)
            folder = root / "images" if layout == "flat" else root / f"images_{i // 5 + 1:03d}"
            folder = folder if layout == "flat" else folder / "images"
            folder.mkdir(parents=True, exist_ok=True)
            image = chest_phantom(size, np.random.default_rng([seed, p, k]))
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / name)
            view = "PA" if i % 2 == 0 else "AP"
            sex = "M" if p % 2 else "F"
            rows.append([name, "No Finding", k, p, 40 + p, sex, view, size, size, 0.143, 0.143])
            names.append(name)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(NIH_HEADER)
        writer.writerows(rows)
    first_test = n_patients - n_test_patients + 1
    test = [n for n in names if int(n[:8]) >= first_test]
    train_val = [n for n in names if int(n[:8]) < first_test]
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return names
