"""A seeded synthetic chest radiograph (numpy only), for tests and smoke training.

The phantom is drawn in normalized coordinates (u across, v down, both in [-1, 1]) with bone
bright (MONOCHROME2): a body outline, two dark lung fields, the heart and mediastinum, the
spine with vertebral bodies, curved ribs on both sides, clavicles, and band-limited texture
plus a little white noise. Edges are anti-aliased over about one pixel, so the image has
sharp edges and fine detail at any size, which is what a super-resolution model must keep.
"""

from __future__ import annotations

import numpy as np


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 ramp across a signed distance ``d`` (positive inside), ``width`` wide."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _ellipse(
    u: np.ndarray,
    v: np.ndarray,
    cu: float,
    cv: float,
    au: float,
    av: float,
    angle: float,
    edge: float,
) -> np.ndarray:
    """Anti-aliased filled ellipse, 1 inside; ``angle`` in radians."""
    c, s = np.cos(angle), np.sin(angle)
    x = ((u - cu) * c + (v - cv) * s) / au
    y = (-(u - cu) * s + (v - cv) * c) / av
    r = np.sqrt(x * x + y * y)
    return _soft((1.0 - r) * min(au, av), edge)


def _band(dist: np.ndarray, half_width: float, edge: float) -> np.ndarray:
    """Anti-aliased band of ``half_width`` around a curve, given |distance| to it."""
    return _soft(half_width - np.abs(dist), edge)


def _texture(rng: np.random.Generator, size: int, cutoff: float) -> np.ndarray:
    """Gaussian noise low-passed at ``cutoff`` cycles per pixel, unit standard deviation."""
    noise = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    filt = np.exp(-(fx * fx + fy * fy) / (2.0 * cutoff * cutoff))
    out = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(size, size))
    return out / max(float(out.std()), 1e-12)


def chest_phantom(size: int = 512, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Draw one chest phantom.

    Args:
        size: side in pixels (>= 16).
        seed: an int or a ``numpy.random.Generator``; the same int gives the same image.

    Returns:
        float32 ``[size, size]`` in [0, 1], bone bright.
    """
    if size < 16:
        raise ValueError(f"phantom size must be >= 16, got {size}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    edge = 2.0 / size  # one pixel in normalized units
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(coords, coords, indexing="ij")
    j = lambda scale: float(rng.uniform(-scale, scale))

    img = np.full((size, size), 0.04 + j(0.02))
    body = _ellipse(u, v, j(0.03), 0.08 + j(0.03), 0.86 + j(0.05), 1.05 + j(0.04), 0.0, edge)
    img += (0.50 + j(0.05)) * body

    # lungs: dark fields, slightly asymmetric (the heart sits left of the patient's midline)
    lung_dark = 0.30 + j(0.05)
    lungs = np.zeros_like(img)
    for side in (-1.0, 1.0):
        cu = side * (0.36 + j(0.03))
        au = 0.25 + j(0.02) + (0.02 if side < 0 else 0.0)
        lung = _ellipse(u, v, cu, -0.05 + j(0.04), au, 0.55 + j(0.04), side * j(0.12), edge)
        lungs = np.maximum(lungs, lung)
    img -= lung_dark * lungs * body

    # heart and mediastinum: soft tissue over the lungs
    heart = _ellipse(
        u, v, 0.12 + j(0.04), 0.25 + j(0.04), 0.30 + j(0.03), 0.25 + j(0.03), 0.3 + j(0.1), edge
    )
    mediastinum = _soft(0.09 + 0.03 * (v + 1.0) - np.abs(u - 0.02), edge) * (v < 0.55)
    img += lung_dark * 0.8 * np.maximum(heart, mediastinum) * lungs

    # spine: a bright column with vertebral bodies and darker disc spaces
    spine_w = 0.065 + j(0.01)
    spine = _soft(spine_w - np.abs(u - j(0.01)), edge) * _soft(0.95 - np.abs(v), edge)
    period = 0.16 + j(0.02)
    discs = 0.5 + 0.5 * np.cos(2.0 * np.pi * (v + j(1.0)) / period)
    img += spine * body * (0.10 + 0.06 * discs)

    # ribs: curved bands on both sides, posterior arcs falling towards the sides
    n_ribs = int(rng.integers(9, 12))
    rib_v0 = np.linspace(-0.70, 0.45, n_ribs)
    rib_hw = 0.018 + j(0.004)
    ribs = np.zeros_like(img)
    for k in range(n_ribs):
        curv = 0.55 + j(0.1)
        for side in (-1.0, 1.0):
            x = side * u - 0.06
            curve = rib_v0[k] + j(0.015) + curv * x * x - 0.15 * x
            mask = _soft(x, edge) * _soft(0.80 - x, 0.1)
            ribs = np.maximum(ribs, _band(v - curve, rib_hw, edge) * mask)
    img += (0.10 + j(0.02)) * ribs * body

    # clavicles: gently S-shaped bands near the top
    for side in (-1.0, 1.0):
        x = side * u
        curve = -0.66 + j(0.03) - 0.12 * x + 0.06 * np.sin(3.0 * x)
        mask = _soft(x - 0.06, edge) * _soft(0.62 - x, edge)
        img += (0.14 + j(0.02)) * _band(v - curve, 0.025, edge) * mask * body

    # texture: vessels-like mid frequencies in the lungs, fine grain everywhere
    img += 0.030 * _texture(rng, size, cutoff=0.02) * lungs * body
    img += 0.012 * _texture(rng, size, cutoff=0.12) * body
    img += 0.004 * rng.standard_normal((size, size))
    return np.clip(img, 0.0, 1.0).astype(np.float32)
