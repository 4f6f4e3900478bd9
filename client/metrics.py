"""Image-quality metrics in numpy: PSNR, SSIM, MS-SSIM and HFEN.

Every function takes two images of the same shape, either one image ``[H, W]`` (returns a
float) or a batch ``[N, H, W]`` / ``[N, 1, H, W]`` (returns float64 ``[N]``, one value per
image). Intensities are expected in ``[0, data_range]``. Arithmetic is float64.

Gaussian and LoG filters are separable numpy convolutions with symmetric ("reflect" in
scipy's naming) borders; SSIM and MS-SSIM only average the interior where the window fits,
so their borders never matter.

``lr_psnr`` (LR consistency) scores an SR image against the LR input it was made from.
"""

from __future__ import annotations

import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11-tap window, as Wang et al. 2004 (and skimage's truncate=3.5)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
HFEN_SIGMA = 1.5
HFEN_SIZE = 15  # 15 x 15 LoG kernel, as Ravishankar & Bresler 2011


def _as_batch(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both inputs as float64 ``[N, H, W]`` plus whether the input was a single image."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected [N, 1, H, W], got {x.shape}")
        x, y = x[:, 0], y[:, 0]
    elif x.ndim not in (2, 3):
        raise ValueError(f"expected [H, W], [N, H, W] or [N, 1, H, W], got {x.shape}")
    single = x.ndim == 2
    if single:
        x, y = x[None], y[None]
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("images contain NaN or infinite values")
    return x, y, single


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def _check_range(data_range: float) -> float:
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    return float(data_range)


def _correlate1d(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Same-size correlation of ``x`` along ``axis`` with an odd-length kernel, symmetric pad."""
    r = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for k, w in enumerate(kernel):
        out += w * np.take(xp, np.arange(k, k + n), axis=axis)
    return out


def _separable(x: np.ndarray, k_rows: np.ndarray, k_cols: np.ndarray) -> np.ndarray:
    """Filter the last two axes of ``x`` with ``k_rows`` (along H) then ``k_cols`` (along W)."""
    return _correlate1d(_correlate1d(x, k_rows, -2), k_cols, -1)


def gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """Normalized 1-D Gaussian, ``2 * radius + 1`` taps (as ``scipy.ndimage``)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB, ``10 log10(R^2 / MSE)``; ``inf`` for equal images."""
    r = _check_range(data_range)
    x, y, single = _as_batch(x, y)
    mse = np.mean((x - y) ** 2, axis=(-2, -1))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(r * r / mse)
    return _out(values, single)


def _ssim_terms(
    x: np.ndarray, y: np.ndarray, data_range: float, k1: float = 0.01, k2: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """Luminance and contrast-structure maps ``[N, H - 10, W - 10]`` (interior only)."""
    g = gaussian_kernel(SSIM_SIGMA, SSIM_RADIUS)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    stack = np.stack([x, y, x * x, y * y, x * y])  # one filtering pass for all five moments
    mx, my, mxx, myy, mxy = _separable(stack, g, g)
    vx = mxx - mx * mx  # population (not sample) covariance
    vy = myy - my * my
    vxy = mxy - mx * my
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    cs = (2 * vxy + c2) / (vx + vy + c2)
    r = SSIM_RADIUS
    return lum[..., r:-r, r:-r], cs[..., r:-r, r:-r]


def _check_size(x: np.ndarray, need: int, name: str) -> None:
    if min(x.shape[-2:]) < need:
        raise ValueError(f"{name} needs images of at least {need}x{need}, got {x.shape[-2:]}")


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float | np.ndarray:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004).

    Gaussian window sigma 1.5 (11 taps), K1 = 0.01, K2 = 0.03, population covariances,
    mean over the interior where the window fits. Equals
    ``skimage.metrics.structural_similarity(x, y, data_range=..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``. Images must be at least 11 x 11.
    """
    r = _check_range(data_range)
    x, y, single = _as_batch(x, y)
    _check_size(x, 2 * SSIM_RADIUS + 1, "ssim")
    lum, cs = _ssim_terms(x, y, r)
    return _out((lum * cs).mean(axis=(-2, -1)), single)


def _halve(x: np.ndarray) -> np.ndarray:
    """2 x 2 mean pooling of the last two axes (an odd last row / column is dropped)."""
    h, w = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
    x = x[..., :h, :w]
    return 0.25 * (
        x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]
    )


def ms_ssim(
    x: np.ndarray, y: np.ndarray, data_range: float = 1.0, scales: int | None = None
) -> float | np.ndarray:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003).

    ``prod_{j<M} cs_j^{w_j} * ssim_M^{w_M}`` with the paper's weights (0.0448, 0.2856,
    0.3001, 0.2363, 0.1333), the SSIM window above at every scale and 2 x 2 mean pooling
    between scales; negative per-scale terms are clipped to 0 (as common implementations do).

    The standard 5 scales need the coarsest image to hold the 11-tap window, i.e. a shorter
    side >= 11 * 2^4 = 176: 256 x 256 images use all 5 (coarsest 16 x 16). For smaller
    images (``scales=None``) the largest count that fits is used, with the first weights
    renormalized to sum to 1 (64 x 64 -> 3 scales).
    """
    r = _check_range(data_range)
    x, y, single = _as_batch(x, y)
    win = 2 * SSIM_RADIUS + 1
    fit = 1
    while fit < len(MS_SSIM_WEIGHTS) and min(x.shape[-2:]) // 2**fit >= win:
        fit += 1
    if scales is None:
        scales = fit
    if not 1 <= scales <= fit:
        raise ValueError(f"{scales} scales do not fit images of size {x.shape[-2:]} (max {fit})")
    _check_size(x, win, "ms_ssim")
    w = np.asarray(MS_SSIM_WEIGHTS[:scales])
    w = w / w.sum()
    value = np.ones(x.shape[0])
    for j in range(scales):
        lum, cs = _ssim_terms(x, y, r)
        if j < scales - 1:
            value *= np.maximum(cs.mean(axis=(-2, -1)), 0.0) ** w[j]
            x, y = _halve(x), _halve(y)
        else:
            value *= np.maximum((lum * cs).mean(axis=(-2, -1)), 0.0) ** w[j]
    return _out(value, single)


def log_kernel(sigma: float = HFEN_SIGMA, size: int = HFEN_SIZE) -> np.ndarray:
    """2-D Laplacian-of-Gaussian kernel ``[size, size]``, zero sum (as MATLAB's fspecial)."""
    if size % 2 == 0:
        raise ValueError("LoG kernel size must be odd")
    t = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g2 = np.outer(g, g)
    g2 /= g2.sum()
    r2 = t[:, None] ** 2 + t[None, :] ** 2
    k = g2 * (r2 - 2 * sigma**2) / sigma**4
    return k - k.mean()


def _log_filter(x: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """LoG filtering as three separable passes (the kernel of ``log_kernel``)."""
    t = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    a = g * (t**2 - sigma**2) / sigma**4
    ones = np.ones(size)
    # g2 * (x^2 + y^2 - 2 s^2) / s^4 = (g a) (x) g + g (x) (g a); minus the mean of that kernel.
    mean = 2 * a.sum() * g.sum() / size**2
    return _separable(x, a, g) + _separable(x, g, a) - mean * _separable(x, ones, ones)


def hfen(
    x: np.ndarray, y: np.ndarray, sigma: float = HFEN_SIGMA, size: int = HFEN_SIZE
) -> float | np.ndarray:
    """High-frequency error norm (Ravishankar & Bresler 2011), ``y`` is the reference.

    ``||LoG(x) - LoG(y)||_2 / ||LoG(y)||_2`` with a 15 x 15 LoG of sigma 1.5; 0 for equal
    images, larger is worse. ``inf`` when the reference has no high-frequency content.
    """
    x, y, single = _as_batch(x, y)
    diff = _log_filter(x - y, sigma, size)
    ref = _log_filter(y, sigma, size)
    num = np.sqrt((diff**2).sum(axis=(-2, -1)))
    den = np.sqrt((ref**2).sum(axis=(-2, -1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(num == 0, 0.0, num / den)
    return _out(values, single)


def lr_psnr(
    sr: np.ndarray, lr: np.ndarray, scale: int = 4, data_range: float = 1.0
) -> float | np.ndarray:
    """LR consistency in dB: ``psnr(area_downsample(sr, scale), lr)``.

    The degradation the model inverts is the ``scale`` x ``scale`` area mean
    (``cxr_sr.imaging.area_downsample``), so an SR image that only adds detail the LR input
    allows averages back to that input exactly (``inf``). A lower value than the bicubic
    baseline's means the SR changed the image at LR scale, i.e. invented (or lost) content.
    ``sr`` is ``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]``; ``lr`` the same with the last two
    axes divided by ``scale``. Higher is more consistent.
    """
    from cxr_sr.imaging import area_downsample

    sr = np.asarray(sr)
    lr = np.asarray(lr)
    if sr.ndim != lr.ndim or sr.shape[:-2] != lr.shape[:-2]:
        raise ValueError(f"sr {sr.shape} and lr {lr.shape} differ in their leading axes")
    want = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    if sr.shape[-2:] != want:
        raise ValueError(f"sr is {sr.shape[-2:]}, expected {want} for lr {lr.shape[-2:]} x{scale}")
    return psnr(area_downsample(sr, scale), lr, data_range)
