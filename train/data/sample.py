"""The bundled real radiograph, split spatially into a training and a held-out region.

``RG1_UNCI.dcm`` from the ``pydicom-data`` wheel: a CR chest PA, 1955 rows x 1841 columns,
15 bits stored, MONOCHROME1 (decoded by ``cxr_sr.client.io.read_image``: VOI window applied and
inverted so bone is bright). One image cannot give independent train and test images, so a
strip of it is held out, described by ``holdout = "<side>:<fraction>"``; the default
``"right:0.25"`` keeps the right quarter of the columns (columns 1381-1840, all rows) out of
training, as the measurements in docs/design.md did.

- ``train``: random square crops lying entirely inside the training region. The side is
  ``s * hr_size`` native pixels for ``s`` drawn from ``crop_scales`` (clamped to the region's
  short side), resized to ``hr_size`` with anti-aliasing; flipped left-right half the time.
  No training crop touches a held-out pixel.
- ``val``: fixed crops inside the held-out region at each of ``crop_scales``
  (``grid_boxes``: the fewest crops of that side that cover the strip, evenly spaced).
  A scale whose side exceeds the strip's short side is clamped to it (with the default
  460-column strip, 2x and 4x both become 460 px, a 1.8x downscale, kept once).
- ``test``: the reference protocol applied to the whole held-out region: the strip cut into
  the fewest squares of its short side that cover it (default: 5 squares of 460 px, evenly
  spaced down the rows), each resized to ``hr_size``. That is the closest the strip allows
  to "the whole image resized to 256"; the downscale is 460/256 = 1.8x, not NIH's 4x.

The JPEG 2000 copies in the same wheel (``RG1_J2KI``/``RG1_J2KR``) are the same image, and
the only other radiograph there (``RG3_*``, a CR of a tibia) is not a chest, so neither
gives an independent held-out chest image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_sr.train.data.pairs import Box, PairDataset, Region, grid_boxes, random_box, resize

SAMPLE_FILE = "RG1_UNCI.dcm"
SIDES = ("left", "right", "top", "bottom")


def parse_holdout(spec: str) -> tuple[str, float]:
    """``"right:0.25"`` -> ("right", 0.25)."""
    side, sep, frac = spec.partition(":")
    try:
        fraction = float(frac) if sep else float("nan")
    except ValueError:
        fraction = float("nan")
    if side not in SIDES or not 0.0 < fraction < 1.0:
        raise ValueError(
            f"holdout must be '<side>:<fraction>' with side in {SIDES} and 0 < fraction < 1 "
            f"(e.g. 'right:0.25'), got {spec!r}"
        )
    return side, fraction


def split_regions(height: int, width: int, holdout: str) -> tuple[Region, Region]:
    """(train region, held-out region) of a ``height`` x ``width`` image: complementary strips."""
    side, fraction = parse_holdout(holdout)
    along = width if side in ("left", "right") else height
    k = max(1, round(fraction * along))
    cut = along - k if side in ("right", "bottom") else k
    if side == "right":
        return Region(0, height, 0, cut), Region(0, height, cut, width)
    if side == "left":
        return Region(0, height, cut, width), Region(0, height, 0, cut)
    if side == "bottom":
        return Region(0, cut, 0, width), Region(cut, height, 0, width)
    return Region(cut, height, 0, width), Region(0, cut, 0, width)


def load_sample(name: str = SAMPLE_FILE) -> np.ndarray:
    """Decode a radiograph shipped in ``pydicom-data`` (a file name there), or any image file
    (a path that exists: PNG, TIFF, DICOM...): float32 ``[H, W]`` in [0, 1]."""
    from cxr_sr.client.io import read_image

    if Path(name).is_file():
        return read_image(name)
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise ValueError(
            f"{name} not found in pydicom's test data: install the 'pydicom-data' wheel "
            "(pip install pydicom-data); it is part of the 'train' extra"
        )
    return read_image(path)


class SampleRadiograph(PairDataset):
    """Pairs from one real radiograph, train and held-out regions kept apart (module doc).

    ``image`` (float32 ``[H, W]`` in [0, 1]) replaces the bundled file (tests, other images). Item
    boxes are in ``self.boxes`` for val/test; train boxes come from ``box(index)``.
    """

    def __init__(
        self,
        *,
        split: str,
        seed: int,
        hr_size: int,
        scale: int,
        hflip: bool,
        crop_scales: list[float],
        holdout: str,
        n_train: int,
        file: str = SAMPLE_FILE,
        image: np.ndarray | None = None,
    ) -> None:
        super().__init__(split=split, seed=seed, hr_size=hr_size, scale=scale, hflip=hflip)
        if not crop_scales or min(crop_scales) <= 0:
            raise ValueError(f"crop_scales must be positive numbers, got {crop_scales}")
        if n_train < 1:
            raise ValueError(f"n_train must be >= 1, got {n_train}")
        self.file = file
        self.crop_scales = [float(s) for s in crop_scales]
        self.holdout = holdout
        self.n_train = int(n_train)
        self._image = image
        self._from_file = image is None
        h, w = self._shape()
        self.train_region, self.heldout_region = split_regions(h, w, holdout)
        if split == "val":
            self.boxes = grid_boxes(self.heldout_region, self.crop_scales, hr_size)
        elif split == "test":
            whole = max(self.heldout_region.height, self.heldout_region.width) / hr_size
            self.boxes = grid_boxes(self.heldout_region, [whole], hr_size)
        else:
            self.boxes = []

    def _shape(self) -> tuple[int, int]:
        return self.image.shape  # decoding once here also validates the file early

    @property
    def image(self) -> np.ndarray:
        """The native image, decoded on first use (once per loader worker)."""
        if self._image is None:
            self._image = load_sample(self.file)
        return self._image

    def __getstate__(self) -> dict:
        # workers decode the file themselves instead of receiving 14 MB through a pipe
        state = self.__dict__.copy()
        if self._from_file:
            state["_image"] = None
        return state

    def __len__(self) -> int:
        return self.n_train if self.split == "train" else len(self.boxes)

    def box(self, index: int) -> Box:
        """The native-image crop of item ``index`` (for train: at the current epoch)."""
        if self.split == "train":
            return random_box(
                self.item_rng(index), self.train_region, self.crop_scales, self.hr_size
            )
        return self.boxes[index]

    def name(self, index: int) -> str:
        b = self.box(index)
        return f"{self.file}[y={b.y}:{b.y + b.side},x={b.x}:{b.x + b.side}]@{b.scale:.2f}x"

    def load_hr(self, index: int, rng: np.random.Generator) -> np.ndarray:
        if self.split == "train":
            b = random_box(rng, self.train_region, self.crop_scales, self.hr_size)
        else:
            b = self.boxes[index]
        return resize(b.cut(self.image), self.hr_size)

    def describe(self) -> dict:
        h, w = self.image.shape
        return {
            "source": "sample",
            "file": self.file,
            "split": self.split,
            "image_shape": [h, w],
            "holdout": self.holdout,
            "train_region": vars(self.train_region),
            "heldout_region": vars(self.heldout_region),
            "items": len(self),
            "scale": self.scale_note(),
        }

    def scale_note(self) -> str:
        """The scale of the figures on this split, in words."""
        lr = self.hr_size // self.scale
        if self.split == "train":
            return (
                f"random crops of {self.crop_scales} x {self.hr_size} px -> HR "
                f"{self.hr_size}, LR {lr}"
            )
        sides = sorted({b.side for b in self.boxes})
        crops = ", ".join(f"{s} px ({s / self.hr_size:.2f}x downscale)" for s in sides)
        return (
            f"{len(self.boxes)} held-out squares of {crops} -> HR {self.hr_size}, LR {lr} "
            f"({self.scale}x area)"
        )
