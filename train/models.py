"""The networks: a residual 1-channel AutoencoderKL and the LR-conditioned denoiser.

Shapes for an LR of H x W (VAE factor f, latent channels C; the default f = 4 = the SR scale,
so the latent has the LR's own size):

    LR       [N, 1, H, W]            intensities in [0, 1]
    bicubic  [N, 1, 4H, 4W]          bicubic(LR), the base image
    z        [N, C, 4H/f, 4W/f]
    SR       [N, 1, 4H, 4W]          clip(bicubic + decoder(z / scaling), 0, 1)

The VAE encodes images scaled to [-1, 1]; its decoder predicts only the residual
HR - bicubic(LR) (SRDiff, Li et al. 2022, sec. 3.2), so the latent path carries the detail
that bicubic misses and the VAE's own error lands on that small residual.

Cost and size. Every network is convolutional with no attention over the whole latent, so
memory and time grow linearly with pixels (the first version's VAE had a mid-block
self-attention: at a 256x256 LR, 65,536 tokens, a 16 GiB fp32 matrix per image; it is kept
behind ``mid_attention`` for the ablation). The conditioning latent z_lr is computed by a small
``LREncoder`` that runs at LR resolution, distilled from the VAE encoder of bicubic(LR) in
stage 1, instead of running the VAE encoder over the 16x larger bicubic image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from cxr_sr.imaging import HR_SIZE, SCALE


@dataclass
class VAEConfig:
    """AutoencoderKL geometry; the latent factor is 2 ** (len(channels) - 1)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 8
    residual_scale: float = 4.0  # decoder output * (1 / residual_scale) = residual in [0, 1] units
    residual: bool = True  # False: a plain VAE whose decoder predicts the image (ablation)
    mid_attention: bool = False  # whole-latent self-attention in the mid blocks (first version)
    # channels of the LR-resolution encoder that gives z_lr; [] = encode bicubic(LR) with the
    # VAE encoder (first version: 16x the pixels)
    lr_encoder: list[int] = field(default_factory=lambda: [32, 32])

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1
    attention: bool = False  # attention blocks at the lowest resolution of the down/up path
    norm_groups: int = 8
    # self-attention in the mid block, over all tokens at 1/2**(levels-1) of the latent side:
    # quadratic in pixels (at an LR of 256 and channels [48, 96, 192]: 24 heads x 4096 tokens,
    # 1.5 GiB fp32 per image; 24 GiB at 512). False keeps every network linear in pixels.
    mid_attention: bool = True


def latent_shape(vae, size: int = HR_SIZE) -> tuple[int, int, int]:
    """(C, h, w) of the VAE latent of a ``size`` x ``size`` image (factor 2 ** (levels - 1)).

    ``vae``: an AutoencoderKL, its config, or a ``train.models.VAEConfig``.
    """
    cfg = getattr(vae, "config", vae)
    levels = getattr(cfg, "block_out_channels", None) or cfg.channels
    f = 2 ** (len(levels) - 1)
    return (cfg.latent_channels, size // f, size // f)


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
        mid_block_add_attention=cfg.mid_attention,
    )


def build_lr_encoder(cfg: VAEConfig) -> LREncoder | None:
    if not cfg.lr_encoder:
        return None
    if cfg.factor < SCALE or cfg.factor % SCALE:
        raise ValueError(
            f"an LR encoder needs a VAE factor that is a multiple of {SCALE}, got "
            f"{cfg.factor}; set vae.model.lr_encoder: [] to encode bicubic(LR) with the VAE"
        )
    return LREncoder(
        channels=tuple(cfg.lr_encoder),
        latent_channels=cfg.latent_channels,
        downsample=(cfg.factor // SCALE).bit_length() - 1,
    )


class _ConvBlock(torch.nn.Module):
    """x + conv(silu(conv(silu(x)))) with a 1x1 skip when the width changes; no normalisation,
    so a pixel's output depends only on its neighbourhood (tiles equal the whole image)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = torch.nn.Conv2d(c_in, c_out, 1) if c_in != c_out else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))


class LREncoder(ModelMixin, ConfigMixin):
    """LR [N, 1, H, W] in [0, 1] -> unscaled latent [N, C, H / 2**downsample, W / ...].

    A few convolutional blocks at LR resolution; trained to reproduce the VAE encoder's
    latent mean of bicubic(LR) (stage 1), at 1/16 of its pixels.
    """

    @register_to_config
    def __init__(
        self, channels: tuple[int, ...] = (32, 32), latent_channels: int = 4, downsample: int = 0
    ):
        super().__init__()
        widths = list(channels)
        self.conv_in = torch.nn.Conv2d(1, widths[0], 3, padding=1)
        blocks: list[torch.nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:] + widths[-1:], strict=True):
            blocks.append(_ConvBlock(c_in, c_out))
        for _ in range(downsample):
            blocks.append(torch.nn.Conv2d(widths[-1], widths[-1], 3, stride=2, padding=1))
        self.blocks = torch.nn.Sequential(*blocks)
        self.conv_out = torch.nn.Conv2d(widths[-1], latent_channels, 3, padding=1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv_in(lr * 2.0 - 1.0))
        return self.conv_out(F.silu(x))


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
        add_attention=cfg.mid_attention,
    )


def bicubic(lr: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] -> [N, 1, 4H, 4W], the same resampling as ``cxr_sr.imaging``."""
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
        lr_encoder: LREncoder | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.lr_encoder = lr_encoder
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
        """The ``vae_encoder`` graph: LR [N, 1, H, W] -> scaled latent of bicubic(LR): the
        LR encoder's estimate of it, or (without one) the VAE encoder's latent mean."""
        if self.lr_encoder is None:
            return self.encode_image(bicubic(lr))
        return self.lr_encoder(lr) * self.scaling

    def lr_encoder_loss(self, lr: torch.Tensor) -> torch.Tensor | None:
        """Distillation of the LR encoder: MSE to the (frozen) VAE encoder's latent mean of
        bicubic(LR), in unscaled latent units; None without an LR encoder."""
        if self.lr_encoder is None:
            return None
        with torch.no_grad():
            target = self.vae.encode(bicubic(lr) * 2.0 - 1.0).latent_dist.mean
        return F.mse_loss(self.lr_encoder(lr), target)

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


class RegressionDenoiser(Denoiser):
    """The ablation's direct-regression baseline (``unet.regression``) behind the denoiser's
    interface: it was trained on x_t = 0 at t = T - 1, so it ignores (x_t, t) and predicts the
    clean latent from z_lr alone; a 1-step x0 sampler then returns exactly that prediction."""

    def __init__(self, unet: UNet2DModel, timestep: int):
        super().__init__(unet)
        self.timestep = int(timestep)

    def forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, z_lr: torch.Tensor
    ) -> torch.Tensor:
        t = torch.full_like(timestep, float(self.timestep))
        return self.unet(torch.cat([torch.zeros_like(x_t), z_lr], dim=1), t).sample
