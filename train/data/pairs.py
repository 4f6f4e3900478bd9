"""HR/LR pair making shared by every source: resizing, crops, per-item randomness.

Every dataset here returns ``(hr, lr)``:

    hr  float32 torch tensor [1, hr_size, hr_size]                 in [0, 1]
    lr  float32 torch tensor [1, hr_size / scale, hr_size / scale]  in [0, 1]

with ``lr = area_downsample(hr, scale)`` (``cxr_sr.imaging``, the mean over scale x scale
blocks, i.e. ``F.avg_pool2d``), the degradation the served model is trained to invert.

Determinism: an item's randomness (crop scale, crop position, flip) comes from
``numpy.random.default_rng([seed, split, epoch, index])``, so it is a pure function of
those four numbers, whatever the worker, the batch or the order the loader asks in. The
training loop calls ``set_epoch(epoch)`` before it builds each epoch's iterator (with
``persistent_workers=True`` the change would not reach the workers: do not use it with
``set_epoch``); resuming at epoch e then reproduces epoch e's crops exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cxr_sr import imaging
from cxr_sr.imaging import area_downsample

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RESIZE_MODES = ("crop", "stretch")


def resize(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Antialiased resize of a crop to the HR size: ``cxr_sr.imaging.resize`` with the
    reference filter (``F.interpolate(mode="bilinear", antialias=True)``). ``[H, W]`` ->
    float32 ``[height, width]``, clipped to [0, 1]; unchanged when the size already matches."""
    if image.ndim != 2:
        raise ValueError(f"expected a [H, W] image, got shape {image.shape}")
    return np.clip(imaging.resize(image, height, width, imaging.REFERENCE_FILTER), 0.0, 1.0)


def reference_hr(image: np.ndarray, hr_size: int, mode: str = "crop") -> np.ndarray:
    """The reference protocol: the whole image becomes the HR image.

    ``[H, W]`` -> float32 ``[hr_size, hr_size]``: ``cxr_sr.imaging.reference_hr`` (the
    centred square, resized; ``mode="crop"``), or with ``mode="stretch"`` the whole image
    resized as it is (which changes the aspect ratio). NIH ChestX-ray14 images are square
    (1024 x 1024), so both agree there.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "stretch":
        return resize(image, hr_size)
    return imaging.reference_hr(image, hr_size)


def make_pair(hr: np.ndarray, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S, S]`` HR in [0, 1] -> (hr ``[1, S, S]``, lr ``[1, S/scale, S/scale]``) tensors."""
    hr = np.ascontiguousarray(hr, dtype=np.float32)
    lr = area_downsample(hr, scale)
    return torch.from_numpy(hr[None].copy()), torch.from_numpy(np.ascontiguousarray(lr[None]))


@dataclass(frozen=True)
class Box:
    """A square crop of a native image: rows ``y:y+side``, columns ``x:x+side``.

    ``scale`` is the downscale from native pixels to the HR image (``side / hr_size``).
    """

    y: int
    x: int
    side: int
    scale: float

    def cut(self, image: np.ndarray) -> np.ndarray:
        return image[self.y : self.y + self.side, self.x : self.x + self.side]


@dataclass(frozen=True)
class Region:
    """Rows ``y0:y1`` and columns ``x0:x1`` of a native image."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def contains(self, box: Box) -> bool:
        return (
            self.y0 <= box.y
            and box.y + box.side <= self.y1
            and self.x0 <= box.x
            and box.x + box.side <= self.x1
        )

    def overlaps(self, box: Box) -> bool:
        return (
            box.y < self.y1
            and self.y0 < box.y + box.side
            and box.x < self.x1
            and self.x0 < box.x + box.side
        )


def crop_side(scale: float, hr_size: int, region: Region) -> int:
    """Side in native pixels of a crop at ``scale``, clamped to the region's short side."""
    return max(1, min(round(scale * hr_size), region.height, region.width))


def random_box(rng: np.random.Generator, region: Region, scales: list[float], hr_size: int) -> Box:
    """A crop at a scale drawn uniformly from ``scales``, placed uniformly inside ``region``."""
    side = crop_side(float(scales[int(rng.integers(len(scales)))]), hr_size, region)
    y = region.y0 + int(rng.integers(region.height - side + 1))
    x = region.x0 + int(rng.integers(region.width - side + 1))
    return Box(y, x, side, side / hr_size)


def grid_boxes(region: Region, scales: list[float], hr_size: int) -> list[Box]:
    """Fixed crops covering ``region`` at each scale: for each scale, the fewest crops of that
    side (clamped to the region's short side) that cover the region, evenly spaced
    (neighbours may overlap). A scale whose clamped side repeats an earlier one is skipped."""
    boxes: list[Box] = []
    seen: set[int] = set()
    for s in scales:
        side = crop_side(s, hr_size, region)
        if side in seen:
            continue
        seen.add(side)
        ny = -(-region.height // side)
        nx = -(-region.width // side)
        for y in np.linspace(region.y0, region.y1 - side, ny).round().astype(int):
            for x in np.linspace(region.x0, region.x1 - side, nx).round().astype(int):
                boxes.append(Box(int(y), int(x), side, side / hr_size))
    return boxes


class PairDataset(Dataset):
    """Base class: subclasses give ``__len__``, ``name(i)`` and ``load_hr(i, rng)``.

    ``__getitem__(i)`` -> ``(hr [1, S, S], lr [1, S/scale, S/scale])`` float32 in [0, 1].
    On the train split the HR image is flipped left-right with probability 1/2 when
    ``hflip`` is set. When ``skip_bad`` is set, an item whose file cannot be read is logged
    and replaced by the next readable one (deterministically), so one corrupt file does not
    end a long run.
    """

    def __init__(
        self, *, split: str, seed: int, hr_size: int, scale: int, hflip: bool, skip_bad: bool = True
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if hr_size % scale:
            raise ValueError(f"hr_size {hr_size} is not divisible by scale {scale}")
        self.split = split
        self.seed = int(seed)
        self.hr_size = int(hr_size)
        self.scale = int(scale)
        self.hflip = bool(hflip)
        self.skip_bad = bool(skip_bad)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips ``__getitem__`` returns."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> np.random.Generator:
        """The item's generator: a pure function of (seed, split, epoch, index)."""
        return np.random.default_rng([self.seed, SPLITS.index(self.split), self.epoch, index])

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A short description of item ``index`` (its file name, or its crop box)."""
        raise NotImplementedError

    def load_hr(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """HR image of item ``index``: float32 ``[S, S]`` in [0, 1]."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        tries = min(n, 16) if self.skip_bad else 1
        for k in range(tries):
            i = (index + k) % n
            rng = self.item_rng(i)
            try:
                hr = self.load_hr(i, rng)
            except (ValueError, OSError) as err:
                if k + 1 == tries:
                    raise
                log.warning("skipping unreadable item %d (%s): %s", i, self.name(i), err)
                continue
            if self.split == "train" and self.hflip and rng.random() < 0.5:
                hr = hr[:, ::-1]
            return make_pair(hr, self.scale)
        raise AssertionError("unreachable")
