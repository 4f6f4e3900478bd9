"""Data order for training: which pairs each micro-batch holds, and random aligned patches.

The order is a pure function of (seed, salt, position), so a resumed run sees exactly the
batches the uninterrupted run would have seen; each process of a multi-GPU run takes its
slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class EpochBatches:
    """Index batches of one epoch: a permutation seeded by SeedSequence([seed, salt, epoch]),
    cut into global batches of ``batch_size * world`` (the last partial one dropped); process
    ``rank`` takes every ``world``-th index of each, and the first ``skip`` batches are skipped
    (resuming mid-epoch)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        salt: int,
        epoch: int,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.salt, self.epoch = n, batch_size, seed, salt, epoch
        self.skip, self.rank, self.world = skip, rank, world

    def __len__(self) -> int:
        return max(0, self.n // (self.batch_size * self.world) - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        perm = np.random.default_rng([self.seed, self.salt, self.epoch]).permutation(self.n)
        size = self.batch_size * self.world
        for b in range(self.skip, self.n // size):
            yield perm[b * size : (b + 1) * size][self.rank :: self.world].tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    salt: int,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
) -> Iterator:
    """Infinite iterator of (hr, lr) micro-batches starting at micro-batch ``start``.

    The order is a pure function of (seed, salt, position), so a resumed run sees the batches
    the uninterrupted run would have seen; ``dataset.set_epoch(e)`` (when the dataset has it)
    is called before each epoch's iterator is built, which fixes its per-item randomness.
    """
    per_epoch = len(dataset) // (batch_size * world)
    if per_epoch < 1:
        raise ValueError(
            f"the training set has {len(dataset)} pairs, fewer than one global "
            f"batch of {batch_size * world}"
        )
    epoch, skip = divmod(start, per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batches = EpochBatches(len(dataset), batch_size, seed, salt, epoch, skip, rank, world)
        # own generator: building the iterator must not draw from the global torch RNG
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, salt, epoch]).generate_state(1)[0])
        )
        yield from DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers, generator=gen
        )
        epoch, skip = epoch + 1, 0


def random_patch(
    hr: torch.Tensor, lr: torch.Tensor, size: int, gen: torch.Generator, scale: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random aligned window for the whole batch: hr [N, 1, size, size] and the matching
    lr [N, 1, size/scale, size/scale] (offsets are multiples of 4 * scale); size 0 = no crop."""
    h, w = hr.shape[-2:]
    if size <= 0 or size >= min(h, w):
        return hr, lr
    step = 4 * scale
    y = int(torch.randint(0, (h - size) // step + 1, (1,), generator=gen)) * step
    x = int(torch.randint(0, (w - size) // step + 1, (1,), generator=gen)) * step
    ls = size // scale
    return (
        hr[..., y : y + size, x : x + size],
        lr[..., y // scale : y // scale + ls, x // scale : x // scale + ls],
    )


class DevicePool:
    """Training pairs drawn once through the loader and held on the training device.

    For small data sets on a fast GPU, where the loader's workers (decoding, cropping,
    resizing) and not the GPU set the pace: ``n`` pairs are drawn once (the dataset's own
    crops, scales and flips, epochs 0, 1, ... in the loader's order), and every batch is then
    a random draw of them, cut and downsampled on the device. Batch ``p`` is a pure function
    of (pool, seed, salt, p), so resuming stays exact.
    """

    def __init__(self, hr: torch.Tensor, scale: int):
        self.hr, self.scale = hr, int(scale)

    @classmethod
    def draw(
        cls, dataset: Dataset, n: int, device: torch.device, seed: int, num_workers: int = 0
    ) -> DevicePool:
        per = max(1, min(64, len(dataset)))
        loader = make_loader(dataset, per, seed, salt=200, num_workers=num_workers)
        chunks, got = [], 0
        while got < n:
            hr, _ = next(loader)
            chunks.append(hr.to(device))
            got += hr.shape[0]
        return cls(torch.cat(chunks)[:n], dataset.scale)

    def __len__(self) -> int:
        return self.hr.shape[0]

    def batches(
        self, batch_size: int, seed: int, salt: int, start: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator:
        """Infinite iterator of (hr, lr) device batches from micro-batch ``start`` on; process
        ``rank`` takes every ``world``-th pair of each global batch."""
        position = start
        while True:
            gen = torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, salt, 300, position]).generate_state(1)[0])
            )
            idx = torch.randint(len(self), (batch_size * world,), generator=gen)[rank::world]
            hr = self.hr[idx.to(self.hr.device)]
            yield hr, F.avg_pool2d(hr, self.scale)
            position += 1
