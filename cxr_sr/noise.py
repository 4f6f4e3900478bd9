"""Sampling noise as a function of position: tiles of one image draw the same noise.

The noise of a row is a field over the *global* latent grid of the image it belongs to, not
a stream: the value at channel c, latent position (y, x) of draw k depends only on
(seed, row, k, c, y, x), the channel count and the block side. A request that covers a window
of a larger image (a tile, its top-left latent pixel at ``(y, x)``) gets exactly that window
of the field, so overlapping tiles agree where they overlap and the whole image equals its
tiles.

    draw 0      the start noise (x_T, or the noise of the SDEdit start)
    draw k >= 1 the noise added after the k-th denoiser call (DDPM, DDIM with eta > 0)

The grid is cut into ``block`` x ``block`` squares, each filled with [C, block, block]
standard normals from its own PCG64 generator; a window draws only the blocks it touches.
Block (by, bx) != (0, 0) is keyed by a fixed-width SeedSequence entropy (seed as two 32-bit
words, row, draw, by, bx), so no two keys collide. Block (0, 0) replays the stream every row
drew before noise had a position (the k-th ``standard_normal`` call on ``PCG64([seed, row])``
is draw k): with ``block`` = the latent side of a 64x64 LR (:func:`legacy_block`), a 64x64
request keeps, bit for bit, the output it had when the service took 64x64 inputs only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEED_LIMIT = 2**63  # seeds are int64 on the wire
_WORD = 2**32
_DOMAIN = 0x6E6F6973  # "nois": keeps the block streams apart from the row stream of block 0


def legacy_block(vae_factor: int, lr_side: int = 64, scale: int = 4) -> int:
    """The noise block side for a VAE of factor f: the latent side of a ``lr_side`` LR."""
    return max(1, lr_side * scale // vae_factor)


@dataclass(frozen=True)
class NoiseKey:
    """Whose noise a row draws: ``seed``, ``row`` (its index in the request), the global
    latent position ``(y, x)`` of its top-left latent pixel (0, 0 for a whole image) and the
    field's ``block`` side in latent pixels."""

    seed: int
    row: int = 0
    y: int = 0
    x: int = 0
    block: int = 64

    def __post_init__(self) -> None:
        limits = {"seed": SEED_LIMIT, "row": _WORD, "y": _WORD, "x": _WORD, "block": 4097}
        for name, limit in limits.items():
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"noise {name} must be an integer, got {value!r}")
            low = 1 if name == "block" else 0
            if not low <= int(value) < limit:
                raise ValueError(f"noise {name} must be in [{low}, {limit - 1}], got {value}")
            object.__setattr__(self, name, int(value))

    def window(self, draw: int, shape: Sequence[int]) -> np.ndarray:
        """float32 [C, h, w]: draw ``draw`` of the field at this key's window."""
        return RowNoise(self).window(draw, shape)


class RowNoise:
    """The draws of one row's field. Draws may come in any order; in order (as the sampling
    loop asks for them) block (0, 0)'s stream is advanced once per draw, never replayed."""

    def __init__(self, key: NoiseKey):
        self.key = key
        self._stream: np.random.Generator | None = None
        self._made = 0  # draws taken from the block (0, 0) stream
        self._last: np.ndarray | None = None

    def _origin_block(self, draw: int, channels: int) -> np.ndarray:
        b = self.key.block
        if self._stream is None or self._made > draw + 1 or self._last.shape[0] != channels:
            self._stream = np.random.Generator(np.random.PCG64([self.key.seed, self.key.row]))
            self._made = 0
        while self._made <= draw:
            self._last = self._stream.standard_normal((channels, b, b), dtype=np.float32)
            self._made += 1
        return self._last

    def _block(self, draw: int, by: int, bx: int, channels: int) -> np.ndarray:
        if by == 0 and bx == 0:
            return self._origin_block(draw, channels)
        k = self.key
        words = np.array(
            [_DOMAIN, k.seed % _WORD, k.seed // _WORD, k.row, draw, by, bx], dtype=np.uint32
        )
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))
        return rng.standard_normal((channels, k.block, k.block), dtype=np.float32)

    def window(self, draw: int, shape: Sequence[int]) -> np.ndarray:
        """float32 [C, h, w]: draw ``draw`` of the field at latent rows y..y+h, cols x..x+w."""
        channels, h, w = (int(s) for s in shape)
        if not 0 <= draw < _WORD:
            raise ValueError(f"draw must be in [0, {_WORD - 1}], got {draw}")
        k, b = self.key, self.key.block
        out = np.empty((channels, h, w), dtype=np.float32)
        y1, x1 = k.y + h, k.x + w
        for by in range(k.y // b, -(-y1 // b)):
            top, bottom = max(k.y, by * b), min(y1, (by + 1) * b)
            for bx in range(k.x // b, -(-x1 // b)):
                left, right = max(k.x, bx * b), min(x1, (bx + 1) * b)
                src = self._block(draw, by, bx, channels)
                out[:, top - k.y : bottom - k.y, left - k.x : right - k.x] = src[
                    :, top - by * b : bottom - by * b, left - bx * b : right - bx * b
                ]
        return out


def noise_keys(
    seeds: Sequence[int],
    sizes: Sequence[int],
    origins: Sequence[tuple[int, int]] | None = None,
    block: int = 64,
) -> list[NoiseKey]:
    """One key per row: row i of a request with seed s and latent origin o is
    ``NoiseKey(s, i, *o, block)``. Rows are independent of how requests are batched together,
    so the same seed and input give the same output whatever else the server is doing."""
    origins = [(0, 0)] * len(seeds) if origins is None else list(origins)
    keys = []
    for seed, n, (y, x) in zip(seeds, sizes, origins, strict=True):
        keys.extend(NoiseKey(seed, i, y, x, block) for i in range(n))
    return keys


def draw_noise(rows: Sequence[RowNoise], draw: int, shape: Sequence[int]) -> np.ndarray:
    """float32 [N, C, h, w]: each row's window of draw ``draw`` (``shape`` = (C, h, w))."""
    return np.stack([r.window(draw, shape) for r in rows])
