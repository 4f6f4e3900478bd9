"""Tiling: super-resolve an image larger than the server accepts, without visible seams.

Pure numpy; the network is a callable, so the same driver runs against the server
(``SRClient.upscale``), the offline pipeline (``train.pipeline``) and fakes in the tests.

Geometry (all plans are in LR pixels; the SR is ``scale`` times larger):

- each axis of length ``n`` is covered by the fewest tiles ``k`` of at most ``max_side``
  that overlap their neighbours by at least ``overlap`` pixels, all of one length ``t``
  (the least that covers ``n`` with ``k`` of them), their starts spread evenly from 0 to
  ``n - t``. Every tile of a plan has the same size, so all tiles can share one batch;
- a tile's output is trusted only ``margin`` LR pixels away from an edge it shares with a
  neighbour (near a tile edge the network sees padding, not the image). Between two
  neighbours the weights cross-fade linearly over what is left of their overlap
  (feathering); each tile's 2-D weight is the outer product of its row and column weights,
  normalised so the weights of all tiles sum to 1 at every output pixel.

So a function whose output at a pixel depends only on the LR pixels within ``margin`` of it
(pointwise, bicubic upsampling, ...) gives exactly the same image through the tiles as
whole. A network with global statistics (GroupNorm) or per-tile noise differs slightly
everywhere, and the cross-fade hides the step at the tile borders.

    plan = plan_tiles(h, w, max_side=256)
    sr = run_tiled(per_tile, lr, plan)  # per_tile(tiles [B,1,th,tw], origins) -> [B,1,4th,4tw]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cxr_sr.imaging import SCALE

# A tile function: (tiles float32 [B, 1, th, tw], origins [(top, left)] in LR pixels of the
# whole image) -> SR float32 [B, 1, scale * th, scale * tw].
TileFunction = Callable[[np.ndarray, Sequence[tuple[int, int]]], np.ndarray]


def default_overlap(tile: int) -> int:
    """LR pixels shared by neighbouring tiles: a quarter of the tile side, at least 8."""
    return max(8, tile // 4)


def default_margin(overlap: int) -> int:
    """LR pixels discarded at a shared tile edge: a quarter of the overlap, at least 2."""
    return max(2, overlap // 4)


@dataclass(frozen=True)
class Tile:
    """One tile in LR pixels of the whole image."""

    top: int
    left: int
    height: int
    width: int

    @property
    def origin(self) -> tuple[int, int]:
        return self.top, self.left

    def slices(self, scale: int = 1) -> tuple[slice, slice]:
        """(rows, cols) of this tile in an image ``scale`` times the LR."""
        s = scale
        return (
            slice(s * self.top, s * (self.top + self.height)),
            slice(s * self.left, s * (self.left + self.width)),
        )


def axis_starts(n: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Starts of the fewest ``tile``-long windows covering ``[0, n)`` with neighbours sharing
    at least ``overlap`` pixels, spread evenly from 0 to ``n - tile``."""
    if n <= tile:
        return (0,)
    k = math.ceil((n - overlap) / (tile - overlap))
    return tuple(int(round(i * (n - tile) / (k - 1))) for i in range(k))


@dataclass(frozen=True)
class TilePlan:
    """How an LR image of ``height`` x ``width`` is cut: tiles of ``tile_h`` x ``tile_w`` at
    every (row start, column start) pair; ``margin`` as in the module docstring."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    margin: int

    @property
    def tiles(self) -> list[Tile]:
        """Row-major list of the tiles."""
        return [Tile(r, c, self.tile_h, self.tile_w) for r in self.rows for c in self.cols]

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @cached_property
    def _axis_weights(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return (
            feather_weights(self.height, self.rows, self.tile_h, self.margin, SCALE),
            feather_weights(self.width, self.cols, self.tile_w, self.margin, SCALE),
        )

    def weights(self, scale: int = SCALE) -> list[np.ndarray]:
        """Per-tile blending weights, float32 ``[scale * tile_h, scale * tile_w]``, in the
        order of :attr:`tiles`; placed at ``tile.slices(scale)`` they sum to 1 everywhere."""
        if scale == SCALE:
            wr, wc = self._axis_weights
        else:
            wr = feather_weights(self.height, self.rows, self.tile_h, self.margin, scale)
            wc = feather_weights(self.width, self.cols, self.tile_w, self.margin, scale)
        return [np.outer(r, c).astype(np.float32) for r in wr for c in wc]


def fitted_tile(n: int, tile: int, overlap: int, min_side: int = 1) -> int:
    """The least window length (at least ``min_side``, at most ``tile``) that covers ``n``
    with as few windows as ``tile`` needs: spread evenly, ``k`` windows of ``tile`` may
    overlap far more than ``overlap`` (512 in windows of 256 with overlap 64: 3 windows
    overlapping by 128), and shrinking them to ``ceil((n + (k - 1) * overlap) / k)`` (214)
    leaves the same count and overlap with fewer pixels to compute."""
    if n <= tile:
        return n
    k = len(axis_starts(n, tile, overlap))
    return min(tile, max(min_side, -(-(n + (k - 1) * overlap) // k)))


def plan_tiles(
    height: int,
    width: int,
    max_side: int,
    overlap: int | None = None,
    margin: int | None = None,
    min_side: int = 1,
) -> TilePlan:
    """The tiling of an LR image ``height`` x ``width`` for a server taking sides from
    ``min_side`` to ``max_side``. An image that fits is one tile; a larger one gets the
    fewest tiles of at most ``max_side`` per axis, shrunk to the least side that still
    covers it with that count (:func:`fitted_tile`). ``overlap`` (default
    :func:`default_overlap` of ``max_side``) must leave room for the ``margin`` on both
    sides: ``2 * margin < overlap < tile side``. Raises ``ValueError`` otherwise."""
    if min(height, width, max_side) < 1:
        raise ValueError(f"sizes must be positive, got {height}x{width}, max side {max_side}")
    overlap = default_overlap(max_side) if overlap is None else int(overlap)
    margin = default_margin(overlap) if margin is None else int(margin)
    if margin < 0 or overlap <= 2 * margin:
        raise ValueError(
            f"overlap ({overlap}) must exceed twice the margin ({margin}): the tiles need "
            "pixels to cross-fade in"
        )
    if max(height, width) > max_side and overlap >= max_side:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile side ({max_side})")
    tile_h = fitted_tile(height, max_side, overlap, min_side)
    tile_w = fitted_tile(width, max_side, overlap, min_side)
    return TilePlan(
        height,
        width,
        tile_h,
        tile_w,
        axis_starts(height, tile_h, overlap),
        axis_starts(width, tile_w, overlap),
        margin,
    )


def feather_weights(
    n: int, starts: Sequence[int], tile: int, margin: int, scale: int = SCALE
) -> list[np.ndarray]:
    """1-D weights of each window, float64 ``[scale * tile]``, summing to 1 over the axis.

    Between windows i and i+1 the weight of i falls linearly (and that of i+1 rises) across
    ``[start[i+1] + margin, start[i] + tile - margin)`` (LR pixels, evaluated at the centres of
    the ``scale`` x finer output pixels); nothing comes from within ``margin`` of an edge
    that has a neighbour. Image edges (no neighbour) keep full weight.
    """
    x = np.arange(scale * n, dtype=np.float64) + 0.5  # output pixel centres
    weights = []
    for i, s in enumerate(starts):
        w = np.ones_like(x)
        if i > 0:  # rises across the overlap with the previous window
            a, b = scale * (s + margin), scale * (starts[i - 1] + tile - margin)
            w *= _ramp(x, a, b)
        if i + 1 < len(starts):  # falls across the overlap with the next window
            a, b = scale * (starts[i + 1] + margin), scale * (s + tile - margin)
            w *= 1.0 - _ramp(x, a, b)
        inside = np.zeros_like(x)
        inside[scale * s : scale * (s + tile)] = 1.0
        weights.append(w * inside)
    total = np.sum(weights, axis=0)
    if not (total > 0).all():  # cannot happen for plans made by plan_tiles
        raise ValueError("the windows leave pixels without weight")
    return [
        (w / total)[scale * s : scale * (s + tile)] for w, s in zip(weights, starts, strict=True)
    ]


def _ramp(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """0 before ``a``, 1 after ``b``, linear in between (a step at the middle if b <= a)."""
    if b <= a:
        return (x >= 0.5 * (a + b)).astype(np.float64)
    return np.clip((x - a) / (b - a), 0.0, 1.0)


def cut(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """The tiles of ``image`` ``[H, W]``, float32 ``[len(plan), 1, tile_h, tile_w]``."""
    x = np.asarray(image, dtype=np.float32)
    if x.shape != (plan.height, plan.width):
        raise ValueError(f"image is {x.shape}, the plan is for {plan.height}x{plan.width}")
    return np.stack([x[t.slices()] for t in plan.tiles])[:, None]


def blend(outputs: np.ndarray, plan: TilePlan, scale: int = SCALE) -> np.ndarray:
    """Tile outputs ``[len(plan), 1, scale * tile_h, scale * tile_w]`` (or without the
    channel axis) -> the whole image, float32 ``[scale * H, scale * W]``."""
    y = np.asarray(outputs, dtype=np.float32)
    if y.ndim == 4:
        y = y[:, 0]
    want = (len(plan), scale * plan.tile_h, scale * plan.tile_w)
    if y.shape != want:
        raise ValueError(f"tile outputs are {y.shape}, expected {want}")
    out = np.zeros((scale * plan.height, scale * plan.width), dtype=np.float32)
    for tile, w, part in zip(plan.tiles, plan.weights(scale), y, strict=True):
        out[tile.slices(scale)] += w * part
    return out


def run_tiled(
    fn: TileFunction,
    image: np.ndarray,
    plan: TilePlan,
    batch: int = 8,
    progress: Callable[[int], None] | None = None,
    scale: int = SCALE,
) -> np.ndarray:
    """``fn`` over the tiles of ``image`` ``[H, W]``, ``batch`` tiles per call, blended back
    into float32 ``[scale * H, scale * W]``. ``progress(k)`` is called after each call with
    the number of tiles it handled."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    tiles = cut(image, plan)
    origins = [t.origin for t in plan.tiles]
    outputs = []
    for i in range(0, len(tiles), batch):
        out = np.asarray(fn(tiles[i : i + batch], origins[i : i + batch]), dtype=np.float32)
        want = (len(tiles[i : i + batch]), 1, scale * plan.tile_h, scale * plan.tile_w)
        if out.shape != want:
            raise ValueError(f"tile function returned {out.shape}, expected {want}")
        outputs.append(out)
        if progress is not None:
            progress(len(out))
    return blend(np.concatenate(outputs), plan, scale)


def pad_to(image: np.ndarray, min_side: int) -> np.ndarray:
    """``image`` ``[H, W]`` mirrored (``np.pad`` "symmetric") at the bottom / right up to
    ``min_side`` per axis, for servers that refuse smaller sides; crop the SR back to
    ``[:scale * H, :scale * W]``."""
    x = np.asarray(image, dtype=np.float32)
    h, w = x.shape
    ph, pw = max(0, min_side - h), max(0, min_side - w)
    if not ph and not pw:
        return x
    while ph > 0 or pw > 0:  # symmetric padding reaches at most one image length per pass
        dh, dw = min(ph, x.shape[0]), min(pw, x.shape[1])
        x = np.pad(x, ((0, dh), (0, dw)), mode="symmetric")
        ph, pw = ph - dh, pw - dw
    return x
