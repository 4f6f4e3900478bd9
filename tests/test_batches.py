"""Training batches: the loader's order and the device-held pool (train.batches)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxr_sr.train.batches import DevicePool, make_loader


class Ramp(Dataset):
    """Item i: hr filled with i (8x8), lr its 4x area downsample."""

    scale = 4

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i):
        hr = torch.full((1, 8, 8), float(i)) + torch.arange(64.0).view(1, 8, 8) / 64
        return hr, F.avg_pool2d(hr[None], 4)[0]


def test_pool_holds_the_loaders_first_pairs_and_draws_reproducibly():
    data = Ramp()
    pool = DevicePool.draw(data, 7, torch.device("cpu"), seed=3)
    assert len(pool) == 7
    loader = make_loader(data, 7, 3, salt=200)
    assert torch.equal(pool.hr, next(loader)[0])  # the loader's epoch-0 order, nothing else

    a = pool.batches(4, seed=1, salt=0)
    first = [next(a) for _ in range(3)]
    b = pool.batches(4, seed=1, salt=0, start=2)  # resuming at batch 2
    assert torch.equal(next(b)[0], first[2][0])
    assert not torch.equal(first[0][0], first[1][0])
    other = next(pool.batches(4, seed=1, salt=1))  # the other stage draws its own order
    assert not torch.equal(other[0], first[0][0])
    hr, lr = first[0]
    assert hr.shape == (4, 1, 8, 8) and torch.equal(lr, F.avg_pool2d(hr, 4))


def test_pool_splits_each_global_batch_between_processes():
    pool = DevicePool.draw(Ramp(), 10, torch.device("cpu"), seed=0)
    whole = next(pool.batches(6, seed=5, salt=0))[0]  # one process, the global batch
    parts = [next(pool.batches(3, seed=5, salt=0, rank=r, world=2))[0] for r in range(2)]
    assert whole.shape[0] == 6 and all(p.shape[0] == 3 for p in parts)
    assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])
