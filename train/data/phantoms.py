"""Pairs of synthetic chest phantoms (``train.data.phantom``), for tests and smoke runs."""

from __future__ import annotations

import numpy as np

from cxr_sr.train.data.pairs import SPLITS, PairDataset, reference_hr
from cxr_sr.train.data.phantom import chest_phantom


class PhantomPairs(PairDataset):
    """``n`` phantoms drawn at ``size`` pixels, each resized whole to ``hr_size``.

    Phantom ``i`` of a split is drawn from ``default_rng([seed, split, i])``: the three
    splits never share a phantom, and an item is the same phantom at every epoch (only its
    train-split flip changes with the epoch).
    """

    def __init__(
        self, *, n: int, size: int, split: str, seed: int, hr_size: int, scale: int, hflip: bool
    ) -> None:
        super().__init__(split=split, seed=seed, hr_size=hr_size, scale=scale, hflip=hflip)
        if n < 1:
            raise ValueError(f"the number of phantoms must be >= 1, got {n}")
        if size < hr_size:
            raise ValueError(f"phantom_size {size} must be >= hr_size {hr_size}")
        self.n = int(n)
        self.size = int(size)

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return f"phantom-{self.seed}-{self.split}-{index}"

    def load_hr(self, index: int, rng: np.random.Generator) -> np.ndarray:
        key = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        return reference_hr(chest_phantom(self.size, key), self.hr_size)

    def describe(self) -> dict:
        return {"source": "phantom", "split": self.split, "items": self.n, "size": self.size}
