"""The networks: a residual 1-channel AutoencoderKL and the LR-conditioned denoiser.

Shapes for the default geometry (LR 64, HR 256, VAE factor f, latent channels C):

    LR       [N, 1, 64, 64]      intensities in [0, 1]
    bicubic  [N, 1, 256, 256]    bicubic(LR), the base image
    z        [N, C, 256/f, 256/f]
    SR       [N, 1, 256, 256]    clip(bicubic + decoder(z / scaling), 0, 1)

The VAE encodes images scaled to [-1, 1]; its decoder predicts only the residual
HR - bicubic(LR) (SRDiff, Li et al. 2022, sec. 3.2), so the latent path carries the detail
that bicubic misses and the VAE's own error lands on that small residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel

from cxr_sr.imaging import SCALE


@dataclass
class VAEConfig:
    """AutoencoderKL geometry; the latent factor is 2 ** (len(channels) - 1)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 8
    residual_scale: float = 4.0  # decoder output * (1 / residual_scale) = residual in [0, 1] units
    residual: bool = True  # False: a plain VAE whose decoder predicts the image (ablation)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1
    attention: bool = False
    norm_groups: int = 8


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    n = len(cfg.channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=SCALE * 64,
    )


def build_unet(cfg: UNetConfig, latent_channels: int, latent_size: int) -> UNet2DModel:
    n = len(cfg.channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:  # attention at the lowest resolution only
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=2 * latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
    )


def bicubic(lr: torch.Tensor) -> torch.Tensor:
    """[N, 1, 64, 64] -> [N, 1, 256, 256], the same resampling as ``cxr_sr.imaging``."""
    return F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)


class ResidualVAE(torch.nn.Module):
    """AutoencoderKL whose decoder adds its output to the bicubic image.

    ``scaling`` (latent std, measured after VAE training) makes latents ~unit variance for
    the diffusion; it is saved in the checkpoint config. ``residual=False`` gives the plain
    latent-diffusion VAE (decoder output in [-1, 1] is the image), kept for the ablation.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        scaling: float = 1.0,
        residual_scale: float = 4.0,
        residual: bool = True,
    ):
        super().__init__()
        self.vae = vae
        self.scaling = float(scaling)
        self.residual_scale = float(residual_scale)
        self.is_residual = bool(residual)

    def image(
        self, decoded: torch.Tensor, lr: torch.Tensor, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw decoder output [N, 1, H, W] -> image in [0, 1] units (not clipped);
        ``base`` = bicubic(lr) when the caller already has it."""
        if self.is_residual:
            return (bicubic(lr) if base is None else base) + decoded / self.residual_scale
        return (decoded + 1.0) * 0.5

    def encode_image(self, image: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """image [N, 1, 256, 256] in [0, 1] -> scaled latent (mean, or a posterior sample)."""
        dist = self.vae.encode(image * 2.0 - 1.0).latent_dist
        z = dist.sample() if sample else dist.mean
        return z * self.scaling

    def encode_lr(self, lr: torch.Tensor) -> torch.Tensor:
        """The ``vae_encoder`` graph: LR [N, 1, 64, 64] -> latent mean of bicubic(LR)."""
        return self.encode_image(bicubic(lr))

    def decode(
        self, z: torch.Tensor, lr: torch.Tensor, clip: bool = True, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ``vae_decoder`` graph: (latent, LR) -> SR [N, 1, 256, 256] in [0, 1]."""
        sr = self.image(self.vae.decode(z / self.scaling).sample, lr, base)
        return sr.clamp(0.0, 1.0) if clip else sr


class Denoiser(torch.nn.Module):
    """The ``unet`` graph: (x_t, t, z_lr) -> model output; the LR latent is concatenated."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, z_lr: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(torch.cat([x_t, z_lr], dim=1), timestep).sample
