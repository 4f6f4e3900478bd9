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

The draws are host work that a GPU-resident sampling loop waits for: a batch of 64 rows at
LR 64 takes 15-20 ms on one core of a 2.8 GHz Xeon (``benchmarks.noise``), about what the GPU
needs for the batch's networks. numpy's generators release the GIL while they fill an array,
so :func:`draw_noise` hands the blocks of a large batch to a small thread pool (one thread per
usable core, at most :data:`MAX_THREADS`; ``CXR_NOISE_THREADS`` sets the count, 1 = in the
calling thread). Every block keeps its own generator, so the result is the same bit for bit
whatever the thread count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cxr_sr.host import usable_cores

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

    def _origin_stream(self, draw: int, channels: int) -> np.random.Generator:
        """Block (0, 0)'s stream, able to give draw ``draw`` (restarted if it has passed it)."""
        passed = self._made > draw + 1
        if self._last is not None and self._last.shape[0] != channels:
            passed = True
        if self._stream is None or passed:
            self._stream = np.random.Generator(np.random.PCG64([self.key.seed, self.key.row]))
            self._made = 0
        return self._stream

    def _origin_block(self, draw: int, channels: int) -> np.ndarray:
        stream, b = self._origin_stream(draw, channels), self.key.block
        while self._made <= draw:
            self._last = stream.standard_normal((channels, b, b), dtype=np.float32)
            self._made += 1
        return self._last

    def _block_generator(self, draw: int, by: int, bx: int) -> np.random.Generator:
        """The generator of block (by, bx) != (0, 0) of draw ``draw``."""
        k = self.key
        words = np.array(
            [_DOMAIN, k.seed % _WORD, k.seed // _WORD, k.row, draw, by, bx], dtype=np.uint32
        )
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))

    def pieces(self, draw: int, shape: Sequence[int], out: np.ndarray) -> list[_Piece]:
        """The blocks that draw ``draw`` of a window of ``shape`` touches, each a piece of
        work that writes its own part of ``out`` (float32 [C, h, w]). Their generators are
        made here, in the calling thread: seeding is Python work that holds the GIL, and run
        in threads it would keep them waiting for one another. What is left to a piece is
        the fill, which releases the GIL, and a copy; pieces may run in any order and on any
        thread, but only one at a time may hold a row's block (0, 0) (:func:`draw_noise`
        keeps them so)."""
        channels, h, w = (int(s) for s in shape)
        if not 0 <= draw < _WORD:
            raise ValueError(f"draw must be in [0, {_WORD - 1}], got {draw}")
        if out.shape != (channels, h, w) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(channels, h, w)}, got {out.dtype} {out.shape}")
        k, b = self.key, self.key.block
        y1, x1 = k.y + h, k.x + w
        pieces = []
        for by in range(k.y // b, -(-y1 // b)):
            top, bottom = max(k.y, by * b), min(y1, (by + 1) * b)
            for bx in range(k.x // b, -(-x1 // b)):
                left, right = max(k.x, bx * b), min(x1, (bx + 1) * b)
                dst = out[:, top - k.y : bottom - k.y, left - k.x : right - k.x]
                src = (slice(None), slice(top - by * b, bottom - by * b))
                src += (slice(left - bx * b, right - bx * b),)
                if by == 0 and bx == 0:
                    self._origin_stream(draw, channels)
                    rng = None
                else:
                    rng = self._block_generator(draw, by, bx)
                pieces.append(_Piece(self, draw, rng, dst, src))
        return pieces

    def window(self, draw: int, shape: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """float32 [C, h, w]: draw ``draw`` of the field at latent rows y..y+h, cols x..x+w
        (written into ``out`` when given: a float32 array of that shape)."""
        if out is None:
            out = np.empty(tuple(int(s) for s in shape), dtype=np.float32)
        for piece in self.pieces(draw, shape, out):
            piece()
        return out


@dataclass(frozen=True)
class _Piece:
    """One block of one row's window: draws it (``rng``, or the row's block (0, 0) stream
    when None) and copies its part into ``dst``."""

    row: RowNoise
    draw: int
    rng: np.random.Generator | None
    dst: np.ndarray
    src: tuple[slice, ...]

    def __call__(self) -> None:
        channels = self.dst.shape[0]
        if self.rng is None:
            block = self.row._origin_block(self.draw, channels)
        else:
            b = self.row.key.block
            block = self.rng.standard_normal((channels, b, b), dtype=np.float32)
        self.dst[...] = block[self.src]


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


MAX_THREADS = 8
# below this many values per batch the draws cost less than handing them to threads
PARALLEL_MIN_VALUES = 1 << 15

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)
_pool_lock = threading.Lock()


def noise_threads() -> int:
    """Threads :func:`draw_noise` uses for a large batch: ``CXR_NOISE_THREADS``, else one per
    usable core, at most :data:`MAX_THREADS`."""
    text = os.environ.get("CXR_NOISE_THREADS", "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"CXR_NOISE_THREADS must be an integer, got {text!r}") from None
        if value < 1:
            raise ValueError(f"CXR_NOISE_THREADS must be at least 1, got {value}")
        return value
    return min(MAX_THREADS, usable_cores())


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != threads:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="cxr-noise"))
        return _pool[1]


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def draw_noise(
    rows: Sequence[RowNoise], draw: int, shape: Sequence[int], threads: int | None = None
) -> np.ndarray:
    """float32 [N, C, h, w]: each row's window of draw ``draw`` (``shape`` = (C, h, w)).
    A batch of at least :data:`PARALLEL_MIN_VALUES` values is drawn by ``threads`` threads
    (None: :func:`noise_threads`), every block of every row a task of its own; the result
    does not depend on the thread count."""
    channels, h, w = (int(s) for s in shape)
    out = np.empty((len(rows), channels, h, w), dtype=np.float32)
    threads = noise_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    pieces = [p for i, r in enumerate(rows) for p in r.pieces(draw, shape, out[i])]
    # a row's block (0, 0) is the one piece with state: a row listed twice is drawn here
    distinct = len({id(r) for r in rows}) == len(rows)
    if threads == 1 or len(pieces) == 1 or out.size < PARALLEL_MIN_VALUES or not distinct:
        for piece in pieces:
            piece()
        return out
    pool = _executor(threads)
    for done in [pool.submit(piece) for piece in pieces]:
        done.result()
    return out
