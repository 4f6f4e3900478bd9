"""Training losses (torch). Images are [N, 1, H, W] in [0, 1]; latents [N, C, h, w].

The diffusion target is not defined here: it comes from ``cxr_sr.Schedule.target`` through
:func:`target_coefficients`, so training and sampling share one parameterization.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cxr_sr import Schedule


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32) -> torch.Tensor:
    """Normalised 2-D Gaussian, shape [1, 1, size, size]."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None].to(dtype)


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM per image, shape [N] (Wang et al. 2004, eq. 13; Gaussian 11x11, sigma 1.5).

    Local statistics use the Gaussian window over the valid region (no padding), with the
    sample-covariance correction, K1 = 0.01, K2 = 0.03, as in scikit-image's
    ``structural_similarity(gaussian_weights=True)`` up to its border handling.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two [N, C, H, W] tensors of one shape, got {x.shape}, {y.shape}"
        )
    c = x.shape[1]
    w = gaussian_window(size, sigma, torch.float32).to(x.device).expand(c, 1, size, size)
    x, y = x.float(), y.float()
    conv = lambda t: F.conv2d(t, w, groups=c)
    mu_x, mu_y = conv(x), conv(y)
    n = size * size
    cov_norm = n / (n - 1)
    var_x = cov_norm * (conv(x * x) - mu_x**2)
    var_y = cov_norm * (conv(y * y) - mu_y**2)
    cov = cov_norm * (conv(x * y) - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    s = num / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).abs().mean()


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over every latent element (scalar).

    Kingma & Welling 2014, appendix B. diffusers' ``DiagonalGaussianDistribution.kl`` sums
    instead; the mean keeps the weight independent of the latent size.
    """
    logvar = logvar.float().clamp(-30.0, 20.0)
    return 0.5 * (mean.float() ** 2 + logvar.exp() - 1.0 - logvar).mean()


def radial_mask(h: int, w: int, cutoff: float, device=None) -> torch.Tensor:
    """Boolean [h, w], True where the radial frequency sqrt(fy^2 + fx^2) (cycles/pixel, the
    ``torch.fft.fftfreq`` grid, max 0.5 per axis) is below ``cutoff``."""
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.fftfreq(w, device=device)[None, :]
    return (fy**2 + fx**2).sqrt() < cutoff


def frequency_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    low_weight: float = 1.0,
    high_weight: float = 1.0,
    cutoff: float = 0.25,
    power: int = 2,
) -> torch.Tensor:
    """Frequency-weighted error: mean_k w(k) |F(pred - target)(k)|^power, scalar.

    F is the orthonormal 2-D DFT over the last two axes; w(k) = ``low_weight`` below the radial
    ``cutoff`` and ``high_weight`` above it. With power 2 and both weights 1 this equals the
    pixel MSE (Parseval). Raising ``high_weight`` pushes the model to the fine detail a
    pixel loss under-weights (focal frequency loss, Jiang et al. 2021, simplified to a fixed
    radial mask). power 1 gives an L1-like spectral distance.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {target.shape}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}")
    diff = torch.fft.fft2((pred.float() - target.float()), norm="ortho")
    mag = diff.abs() if power == 1 else diff.real**2 + diff.imag**2
    mask = radial_mask(pred.shape[-2], pred.shape[-1], cutoff, device=pred.device)
    w = torch.where(
        mask,
        torch.tensor(float(low_weight), device=pred.device),
        torch.tensor(float(high_weight), device=pred.device),
    )
    return (mag * w).mean()


def vae_loss(
    recon: torch.Tensor,
    hr: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    l1_weight: float,
    ssim_weight: float,
    fft_weight: float,
    kl_weight: float,
    fft_low_weight: float = 0.0,
    fft_high_weight: float = 1.0,
    fft_cutoff: float = 0.25,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-1 objective on recon vs HR ([N, 1, 256, 256]); returns (loss, parts for logging)."""
    parts: dict[str, torch.Tensor] = {}
    parts["l1"] = l1(recon, hr)
    parts["ssim"] = 1.0 - ssim(recon, hr).mean() if ssim_weight else recon.new_zeros(())
    parts["fft"] = (
        frequency_loss(recon, hr, fft_low_weight, fft_high_weight, fft_cutoff, power=1)
        if fft_weight
        else recon.new_zeros(())
    )
    parts["kl"] = kl_standard_normal(mean, logvar)
    loss = (
        l1_weight * parts["l1"]
        + ssim_weight * parts["ssim"]
        + fft_weight * parts["fft"]
        + kl_weight * parts["kl"]
    )
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def target_coefficients(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-timestep (c_x0, c_eps), float64 [T], with target = c_x0[t] x0 + c_eps[t] eps.

    Every parameterization (eps, v, x0) is linear in (x0, eps); the coefficients are read off
    ``Schedule.target`` evaluated on unit inputs, over ``Schedule.alphas_cumprod``.
    """
    abar = schedule.alphas_cumprod()
    one, zero = np.ones_like(abar), np.zeros_like(abar)
    c_x0 = np.broadcast_to(schedule.target(one, zero, abar), abar.shape)
    c_eps = np.broadcast_to(schedule.target(zero, one, abar), abar.shape)
    return torch.from_numpy(np.array(c_x0)), torch.from_numpy(np.array(c_eps))


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "mse",
    low_weight: float = 1.0,
    high_weight: float = 1.0,
    cutoff: float = 0.25,
) -> torch.Tensor:
    """``mse`` or frequency-weighted ``fft`` error of the denoiser output (scalar)."""
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float())
    if kind == "fft":
        return frequency_loss(pred, target, low_weight, high_weight, cutoff, power=2)
    raise ValueError(f"diffusion loss must be mse or fft, got {kind!r}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [0, 1] images, shape [N] (training logs only)."""
    mse = ((x.float() - y.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return -10.0 * torch.log10(mse)


__all__ = [
    "diffusion_loss",
    "frequency_loss",
    "gaussian_window",
    "kl_standard_normal",
    "l1",
    "psnr",
    "radial_mask",
    "ssim",
    "target_coefficients",
    "vae_loss",
]
