"""Resampling shared by the client, training and the graphs, in numpy.

``bicubic_upsample`` reproduces ``torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`` (Keys kernel, a = -0.75, half-pixel centres, edge clamping), which
is also what the ``vae_encoder`` / ``vae_decoder`` graphs compute (ONNX ``Resize`` cubic),
so the bicubic baseline a client reports is the one the model adds its residual to.
"""

from __future__ import annotations

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


def area_downsample(hr: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Mean over scale x scale blocks of the last two axes (``F.avg_pool2d``)."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by {scale}")
    blocks = hr.reshape(*hr.shape[:-2], h // scale, scale, w // scale, scale)
    return blocks.mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)
