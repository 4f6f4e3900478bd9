"""What each stage minimises, one batch at a time.

Stage 1 (VAE): z ~ q(z | HR), recon = bicubic(LR) + D(z) / residual_scale,
loss = L1 + w (1 - SSIM) [+ frequency term] + small KL (``train.losses.vae_loss``).
Afterwards ``scaling`` = 1 / std of the latent means E(HR) (Rombach et al. 2022, sec. 4.3.2).

Stage 2 (denoiser): x0 = scaling * E(HR), z_lr = scaling * E(bicubic(LR)) (means),
t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4); the
denoiser f(x_t, t, z_lr) regresses ``Schedule.target`` (eps, v or x0). With
``unet.pixel_weight`` > 0 the x0 implied by the output is also decoded by the frozen decoder
and its squared error against HR, relative to bicubic's, is added (``pixel_error_ratio``).

Every random draw goes through the training generator ``gen`` in a fixed order, which is what
makes resuming exact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxr_sr.imaging import HR_SIZE
from cxr_sr.train.batches import make_loader, random_patch
from cxr_sr.train.config import TrainConfig
from cxr_sr.train.losses import diffusion_loss, vae_loss
from cxr_sr.train.models import ResidualVAE, bicubic

# -- stage 1 -------------------------------------------------------------------------------


class VAEObjective(torch.nn.Module):
    """forward(hr, lr, noise) -> (recon, mean, logvar, lr_encoder_mse); one module so DDP sees
    a forward().

    hr [N, 1, 256, 256], lr [N, 1, 64, 64] in [0, 1]; noise [N, C, h, w] (None = posterior mean).
    ``lr_encoder_mse`` trains the LR encoder (when the VAE has one) to reproduce the VAE
    encoder's latent mean of bicubic(LR); None without one.
    """

    def __init__(self, rvae: ResidualVAE):
        super().__init__()
        self.rvae = rvae

    def forward(self, hr, lr, noise):
        dist = self.rvae.vae.encode(hr * 2.0 - 1.0).latent_dist
        z = dist.mean if noise is None else dist.mean + dist.std * noise
        recon = self.rvae.image(self.rvae.vae.decode(z).sample, lr)
        return recon, dist.mean, dist.logvar, self.rvae.lr_encoder_loss(lr)


def vae_batch_loss(
    model: torch.nn.Module,
    hr: torch.Tensor,
    lr: torch.Tensor,
    gen: torch.Generator,
    cfg: TrainConfig,
    latent_shape: tuple[int, int, int],
):
    s = cfg.vae
    hr, lr = random_patch(hr, lr, s.patch_size, gen, cfg.data.scale)
    f = HR_SIZE // latent_shape[1]  # latent_shape is of an HR_SIZE image (models.latent_shape)
    noise = None
    if s.sample_posterior:
        shape = (hr.shape[0], latent_shape[0], hr.shape[-2] // f, hr.shape[-1] // f)
        noise = torch.randn(shape, generator=gen).to(hr.device)
    recon, mean, logvar, lr_encoder_mse = model(hr, lr, noise)
    loss, parts = vae_loss(
        recon,
        hr,
        mean,
        logvar,
        l1_weight=s.l1_weight,
        ssim_weight=s.ssim_weight,
        fft_weight=s.fft_weight,
        kl_weight=s.kl_weight,
        fft_low_weight=s.fft_low_weight,
        fft_high_weight=s.fft_high_weight,
        fft_cutoff=s.fft_cutoff,
    )
    if lr_encoder_mse is not None:
        loss = loss + lr_encoder_mse
        parts["lr_encoder_mse"] = float(lr_encoder_mse.detach())
    return loss, parts


# -- stage 2 -------------------------------------------------------------------------------


def latent_cutmix(x0: torch.Tensor, z_lr: torch.Tensor, prob: float, gen: torch.Generator):
    """Paste a random box of a shuffled partner's (x0, z_lr) into each sample with prob ``prob``.

    CutMix (Yun et al. 2019) applied jointly to the target and condition latents [N, C, h, w].
    """
    n, _, h, w = x0.shape
    apply = torch.rand(n, generator=gen) < prob
    perm = torch.randperm(n, generator=gen)
    frac = torch.rand(n, 2, generator=gen) * 0.5 + 0.25  # box side in [1/4, 3/4]
    corner = torch.rand(n, 2, generator=gen)
    if not bool(apply.any()):
        return x0, z_lr
    x0, z_lr = x0.clone(), z_lr.clone()
    for i in torch.nonzero(apply).flatten().tolist():
        bh, bw = max(1, int(frac[i, 0] * h)), max(1, int(frac[i, 1] * w))
        y, x = int(corner[i, 0] * (h - bh + 1)), int(corner[i, 1] * (w - bw + 1))
        j = int(perm[i])
        x0[i, :, y : y + bh, x : x + bw] = x0[j, :, y : y + bh, x : x + bw]
        z_lr[i, :, y : y + bh, x : x + bw] = z_lr[j, :, y : y + bh, x : x + bw]
    return x0, z_lr


def diffusion_batch_loss(
    denoiser: torch.nn.Module,
    rvae: ResidualVAE,
    hr: torch.Tensor,
    lr: torch.Tensor,
    gen: torch.Generator,
    cfg: TrainConfig,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
):
    """One denoiser regression on a batch; ``tables`` = (abar, c_x0, c_eps), float64 [T]."""
    abar, c_x0, c_eps = tables
    hr, lr = random_patch(hr, lr, cfg.unet.patch_size, gen, cfg.data.scale)
    with torch.no_grad():
        x0 = rvae.encode_image(hr).float()
        z_lr = rvae.encode_lr(lr).float()
    n = hr.shape[0]
    if cfg.unet.latent_cutmix > 0:
        x0, z_lr = latent_cutmix(x0, z_lr, cfg.unet.latent_cutmix, gen)
    t = torch.randint(cfg.unet.t_min, cfg.schedule.num_train_timesteps, (n,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    if cfg.unet.regression:  # the ablation's baseline: x0 from z_lr alone, one pass
        t = torch.full_like(t, cfg.schedule.num_train_timesteps - 1)
    view = lambda table: table[t].float().view(n, 1, 1, 1).to(x0.device)
    x_t = cfg.schedule.q_sample(x0, eps, view(abar))
    if cfg.unet.regression:  # no noise, no schedule: the input carries nothing but z_lr
        x_t = torch.zeros_like(x0)
    target = view(c_x0) * x0 + view(c_eps) * eps
    pred = denoiser(x_t, t.float().to(x0.device), z_lr)
    u = cfg.unet
    loss = diffusion_loss(pred, target, u.loss, u.fft_low_weight, u.fft_high_weight, u.fft_cutoff)
    parts = {"mse": float(torch.mean((pred.detach().float() - target) ** 2))}
    if u.pixel_weight > 0:
        k = t.to(x0.device) < (u.pixel_max_t or cfg.schedule.num_train_timesteps)
        if bool(k.any()):
            x0_hat, _ = cfg.schedule.split(x_t[k], view(abar)[k], pred[k])
            ratio = pixel_error_ratio(rvae, x0_hat, hr[k], lr[k])
            loss = loss + u.pixel_weight * ratio
            parts["pixel_ratio"] = float(ratio.detach())
    return loss, parts


def pixel_error_ratio(
    rvae: ResidualVAE, z: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor
) -> torch.Tensor:
    """MSE(decode(z, lr), HR) / MSE(bicubic(lr), HR) on a batch (gradient flows into z)."""
    base = bicubic(lr)
    sr = rvae.decode(z, lr, clip=False, base=base)
    base_err = F.mse_loss(base.float(), hr.float()).clamp_min(1e-10)
    return F.mse_loss(sr.float(), hr.float()) / base_err


@torch.no_grad()
def measure_scaling(
    rvae: ResidualVAE,
    dataset: Dataset,
    batches: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> float:
    """1 / std of the unscaled latent means E(HR) over ``batches`` fixed batches."""
    old = rvae.scaling
    rvae.scaling = 1.0
    loader = make_loader(dataset, min(batch_size, len(dataset)), seed, salt=99)
    zs = [rvae.encode_image(next(loader)[0].to(device)).float().cpu() for _ in range(batches)]
    rvae.scaling = old
    std = float(torch.cat(zs).std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; the VAE did not train")
    return 1.0 / std
