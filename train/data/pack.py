"""A compact copy of an NIH ChestX-ray14 folder for moving training data to another machine.

    python -m cxr_sr.train.data.pack --root NIH --out data/nih_pack --splits train val

For every image of the chosen splits (the NIH loader's patient-wise splits, so the pack's
splits are the original's), the pack holds, in the NIH layout (``<out>/images/``):

* ``<name>.png``          the whole image, 2x area-downsampled (1024 -> 512), 8-bit; the
                          reference protocol (whole image -> 256) and 2x-scale crops come
                          from it;
* ``<stem>_native.png``   one ``native`` x ``native`` crop at full resolution (seeded
                          position inside the central 80%), for native-scale training crops.

The patient id is still the file name's first field, so ``source: nih`` with
``root: <out>`` splits the pack exactly as the original. About a quarter of the original's
bytes: 340 patients fit in ~45 MB where the originals take ~135 MB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxr_sr.client.io import read_image
from cxr_sr.imaging import area_downsample
from cxr_sr.train.data.nih import nih_split_names, patient_from_name
from cxr_sr.train.data.pairs import SPLITS


def _save(image: np.ndarray, path: Path) -> None:
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, optimize=True)


def pack(
    root: Path,
    out: Path,
    splits: list[str],
    *,
    native: int = 256,
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    seed: int = 0,
) -> list[str]:
    """Write the pack; returns the source image names it holds."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    paths: dict[str, Path] = {}
    for split in splits:
        picked, paths = nih_split_names(
            root,
            split,
            val_fraction=val_fraction,
            split_seed=split_seed,
            test_fraction=test_fraction,
        )
        names += picked
    for name in tqdm(sorted(names), desc="pack", unit="img"):
        image = read_image(paths[name])
        h, w = image.shape
        _save(area_downsample(image[: h - h % 2, : w - w % 2], 2), folder / name)
        rng = np.random.default_rng([seed, int(patient_from_name(name))])
        y0, x0 = int(0.1 * h), int(0.1 * w)
        y = y0 + int(rng.integers(max(1, int(0.8 * h) - native + 1)))
        x = x0 + int(rng.integers(max(1, int(0.8 * w) - native + 1)))
        _save(image[y : y + native, x : x + native], folder / f"{Path(name).stem}_native.png")
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m cxr_sr.train.data.pack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", type=Path, required=True, help="NIH ChestX-ray14 folder")
    p.add_argument("--out", type=Path, required=True, help="pack folder to write")
    p.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=["train", "val"], help="splits to pack"
    )
    p.add_argument("--native", type=int, default=256, help="side of the full-resolution crop")
    p.add_argument("--val-fraction", type=float, default=0.05, help="as DataConfig.val_fraction")
    p.add_argument("--test-fraction", type=float, default=0.1, help="as DataConfig.test_fraction")
    p.add_argument("--split-seed", type=int, default=0, help="as DataConfig.split_seed")
    args = p.parse_args(argv)
    names = pack(
        args.root,
        args.out,
        args.splits,
        native=args.native,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
    )
    size = sum(f.stat().st_size for f in (args.out / "images").iterdir())
    print(f"{len(names)} images packed into {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
