"""Resampling and the HR/LR protocols shared by the client, training and the graphs, in numpy.

``bicubic_upsample`` reproduces ``torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`` (Keys kernel, a = -0.75, half-pixel centres, edge clamping), which
is also what the ``vae_decoder`` graph computes (as a convolution per output phase,
``bicubic_phase_taps``), so the bicubic baseline a client reports is the one the model adds
its residual to.

``resize`` reproduces ``F.interpolate(mode="bilinear" | "bicubic", antialias=True,
align_corners=False)`` (the separable filter widened by the reduction factor, as Pillow and
torchvision do it). The reference HR image uses ``REFERENCE_FILTER`` ("bilinear": the
triangle filter, no overshoot).

The protocols (every user calls these; nothing else makes reference pairs):

- ``reference_pair``: HR = the centred square of the image, resized to ``HR_SIZE`` (256) with
  ``resize(..., REFERENCE_FILTER)`` and clipped to [0, 1]; LR = ``area_downsample(HR, 4)``.
- ``native_pair``: HR = the image itself at its own pixel size, cropped (centred) by at most
  ``scale - 1`` pixels per axis to a multiple of ``scale``; LR = ``area_downsample(HR, 4)``.

Both return a :class:`Pair` (``hr, lr = pair`` unpacks), which also says its scale:
``factor`` (LR -> HR, 4) and ``downscale`` (native pixels per HR pixel).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SCALE = 4
LR_SIZE = 64
HR_SIZE = LR_SIZE * SCALE


def _keys(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x <= 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
    )


@lru_cache(maxsize=16)
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 interpolation weights."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src)
    frac = src - base
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for k in (-1, 0, 1, 2):
        idx = np.clip(base + k, 0, n_in - 1).astype(np.int64)
        np.add.at(w, (np.arange(n_out), idx), _keys(frac - k))
    return w


def bicubic_upsample(lr: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Bicubic resize of the last two axes by an integer factor; float32 out, not clipped."""
    h, w = lr.shape[-2:]
    wh = _bicubic_matrix(h, h * scale).astype(np.float32)
    ww = _bicubic_matrix(w, w * scale).astype(np.float32)
    return np.einsum("oh,...hw,pw->...op", wh, lr.astype(np.float32), ww, optimize=True)


def bicubic_phase_taps(scale: int = SCALE) -> np.ndarray:
    """[scale, 5] float64: the weights ``bicubic_upsample`` gives output pixel ``scale * i + p``
    over input pixels ``i - 2 .. i + 2`` (row ``p``), the same for every ``i`` once the input is
    edge-padded by 2. An integer upscale is thus one 5x5 convolution per output phase followed
    by a pixel shuffle (``builders.graphs.Bicubic``)."""
    return _bicubic_matrix(5, 5 * scale)[2 * scale : 3 * scale]


def bicubic_baseline(lr: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """The bicubic baseline every report scores: ``bicubic_upsample`` clipped to [0, 1].

    Same resampling (torch's bicubic, a = -0.75) as the model's own upsampling of the LR.
    """
    return np.clip(bicubic_upsample(np.asarray(lr, dtype=np.float32), scale), 0.0, 1.0)


def area_downsample(hr: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Mean over scale x scale blocks of the last two axes (``F.avg_pool2d``)."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by {scale}")
    blocks = hr.reshape(*hr.shape[:-2], h // scale, scale, w // scale, scale)
    return blocks.mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


# ----------------------------------------------------------------- antialiased resize

FILTERS = ("bilinear", "bicubic")
REFERENCE_FILTER = "bilinear"


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _keys_half(x: np.ndarray) -> np.ndarray:
    # torch's antialiased bicubic uses a = -0.5 (as Pillow), not the -0.75 of mode="bicubic"
    return _keys(x, a=-0.5)


_FILTER_FN = {"bilinear": (_triangle, 1.0), "bicubic": (_keys_half, 2.0)}


@lru_cache(maxsize=32)
def _aa_matrix(n_in: int, n_out: int, filter: str) -> np.ndarray:
    """[n_out, n_in] float64 weights of torch's antialiased (``antialias=True``) resize.

    Output pixel ``i`` is centred at ``c = (i + 0.5) * s`` input pixels (``s = n_in /
    n_out``); the kernel is stretched by ``max(s, 1)``, cut to the input pixels ``j`` in
    ``[int(c - support + 0.5), int(c + support + 0.5))`` and normalized to sum to 1
    (torch's ``_compute_weights_aa``). Like torch on float32 images, the geometry (``s``,
    ``c``, the kernel's argument) is computed in float32: in float64 the centres of a
    4000-pixel output drift by ~1e-4 pixel from torch's.
    """
    fn, half_width = _FILTER_FN[filter]
    f32 = np.float32
    s = f32(n_in / n_out)
    stretch = max(s, f32(1.0))
    support = f32(half_width) * stretch
    c = s * (np.arange(n_out, dtype=f32) + f32(0.5))
    lo = np.maximum((c - support + f32(0.5)).astype(np.int64), 0)
    hi = np.minimum((c + support + f32(0.5)).astype(np.int64), n_in)
    j = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
    inside = j < hi[:, None]
    k = fn(((j.astype(f32) - c[:, None] + f32(0.5)) / stretch).astype(np.float64))
    k = np.where(inside, k, 0.0)
    total = k.sum(axis=1, keepdims=True)
    k = np.divide(k, total, out=k.copy(), where=total != 0)
    w = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.broadcast_to(np.arange(n_out)[:, None], j.shape)
    w[rows[inside], j[inside]] = k[inside]
    return w


def resize(
    image: np.ndarray, height: int, width: int | None = None, filter: str = REFERENCE_FILTER
) -> np.ndarray:
    """Antialiased resize of the last two axes to ``[height, width]`` (default square).

    ``filter``: "bilinear" or "bicubic", as ``F.interpolate(mode=filter, antialias=True,
    align_corners=False)``. float32 out, not clipped ("bicubic" can overshoot); returned
    unchanged (as float32) when the size already matches.
    """
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    width = height if width is None else width
    x = np.asarray(image, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"expected [..., H, W], got shape {x.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"output size must be positive, got {height}x{width}")
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    wh = _aa_matrix(h, height, filter)
    ww = _aa_matrix(w, width, filter)
    out = np.einsum("oh,...hw,pw->...op", wh, x.astype(np.float64), ww, optimize=True)
    return out.astype(np.float32)


# ----------------------------------------------------------------------- the protocols


@dataclass(frozen=True, eq=False)
class Pair:
    """An HR reference and the LR input made from it, float32 ``[..., H, W]``.

    ``factor``: LR -> HR (``hr.shape == lr.shape * factor``). ``downscale``: native pixels
    per HR pixel (1.0 for ``native_pair``; the square's side / HR size for
    ``reference_pair``). ``hr, lr = pair`` unpacks the two images.
    """

    hr: np.ndarray
    lr: np.ndarray
    factor: int
    downscale: float
    protocol: str

    def __iter__(self):
        return iter((self.hr, self.lr))


def check_image(image: np.ndarray) -> np.ndarray:
    """``image`` as a float32 ``[H, W]`` array; ValueError unless 2-D, real and finite."""
    x = np.asarray(image)
    if x.ndim != 2:
        raise ValueError(f"expected a [H, W] image, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError("image must be real-valued and finite")
    return x.astype(np.float32)


def center_square(image: np.ndarray) -> np.ndarray:
    """Central ``[S, S]`` crop of ``[H, W]``, ``S = min(H, W)`` (odd remainders go right/down)."""
    x = check_image(image)
    h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top : top + s, left : left + s]


def reference_hr(image: np.ndarray, size: int = HR_SIZE) -> np.ndarray:
    """The reference HR image: centred square, ``resize(REFERENCE_FILTER)`` to ``size``,
    clipped to [0, 1]. ``[H, W]`` with ``min(H, W) >= size`` -> float32 ``[size, size]``
    (a reference is never made by enlarging)."""
    x = center_square(image)
    if x.shape[0] < size:
        raise ValueError(
            f"image is {image.shape[0]}x{image.shape[1]}: a {size}x{size} reference needs at "
            f"least {size} pixels on the shorter side"
        )
    return np.clip(resize(x, size, size, REFERENCE_FILTER), 0.0, 1.0)


def reference_pair(image: np.ndarray, size: int = HR_SIZE, scale: int = SCALE) -> Pair:
    """The reference protocol: HR = ``reference_hr(image, size)``, LR = ``area_downsample(HR,
    scale)``. ``[H, W]`` in [0, 1] -> ``Pair(hr [size, size], lr [size/scale, size/scale])``."""
    if size % scale:
        raise ValueError(f"HR size {size} is not divisible by {scale}")
    side = min(np.shape(image)[-2:]) if np.ndim(image) == 2 else 0
    hr = reference_hr(image, size)
    return Pair(hr, area_downsample(hr, scale), scale, side / size, "reference")


def native_pair(image: np.ndarray, scale: int = SCALE) -> Pair:
    """The native-scale protocol: HR = the image at its own pixel size, cropped (centred) by
    at most ``scale - 1`` pixels per axis to a multiple of ``scale`` and clipped to [0, 1];
    LR = ``area_downsample(HR, scale)``. ``[H, W]`` -> ``Pair(hr [H', W'], lr [H'/s, W'/s])``."""
    x = check_image(image)
    h, w = x.shape
    hh, ww = h - h % scale, w - w % scale
    if hh == 0 or ww == 0:
        raise ValueError(f"image {h}x{w} is smaller than {scale}x{scale}")
    top, left = (h % scale) // 2, (w % scale) // 2
    hr = np.clip(x[top : top + hh, left : left + ww], 0.0, 1.0)
    return Pair(hr, area_downsample(hr, scale), scale, 1.0, "native")


PROTOCOLS = {
    "reference": (
        f"HR = centred square resized to {HR_SIZE}x{HR_SIZE} (antialiased {REFERENCE_FILTER}, "
        f"cxr_sr.imaging.reference_pair), LR = {SCALE}x area downsample"
    ),
    "native": (
        f"HR = the image at native scale (cropped to a multiple of {SCALE}, "
        f"cxr_sr.imaging.native_pair), LR = {SCALE}x area downsample"
    ),
}
