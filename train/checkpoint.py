"""The checkpoint folder: the hand-off from training to the builders.

<folder>/
  vae/          AutoencoderKL.save_pretrained (config.json + safetensors)
  lr_encoder/   LREncoder.save_pretrained (absent in first-version checkpoints, which encode
                bicubic(LR) with the VAE encoder)
  unet/         UNet2DModel.save_pretrained
  scheduler/    scheduler_config.json (cxr_sr.Schedule; diffusers DDPMScheduler keys)
  cxr_sr.json   our resolved config: {"format": 1, "latent_scaling": float,
                "residual_scale": float, "residual": bool,
                "sampling": {...defaults...}, "train": {...}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DModel

from cxr_sr import SamplingOptions, Schedule
from cxr_sr.train.models import (
    Denoiser,
    LREncoder,
    RegressionDenoiser,
    ResidualVAE,
    latent_shape,
)

FORMAT = 1
META = "cxr_sr.json"


@dataclass
class Checkpoint:
    vae: ResidualVAE
    denoiser: Denoiser
    schedule: Schedule
    sampling: SamplingOptions  # serving defaults
    meta: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latent for a 256x256 image."""
        return latent_shape(self.vae.vae)


def save(
    folder: str | Path,
    vae: ResidualVAE,
    denoiser: Denoiser,
    schedule: Schedule,
    sampling: SamplingOptions,
    train_config: dict | None = None,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.vae.save_pretrained(folder / "vae")
    if vae.lr_encoder is not None:
        vae.lr_encoder.save_pretrained(folder / "lr_encoder")
    denoiser.unet.save_pretrained(folder / "unet")
    schedule.save(folder / "scheduler")
    meta = {
        "format": FORMAT,
        "latent_scaling": vae.scaling,
        "residual_scale": vae.residual_scale,
        "residual": vae.is_residual,
        "sampling": dict(sampling.__dict__),
        "train": train_config or {},
    }
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_lr_encoder(folder: str | Path) -> LREncoder | None:
    """The checkpoint folder's ``lr_encoder/``, or None when it has none (first-version
    checkpoints and bare VAE folders: z_lr is then the VAE's latent of bicubic(LR))."""
    sub = Path(folder) / "lr_encoder"
    return LREncoder.from_pretrained(sub) if (sub / "config.json").is_file() else None


def load(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: {META} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: checkpoint format {meta.get('format')} != {FORMAT}")
    lr_encoder = load_lr_encoder(folder)
    vae = ResidualVAE(
        AutoencoderKL.from_pretrained(folder / "vae"),
        meta["latent_scaling"],
        meta["residual_scale"],
        meta.get("residual", True),
        lr_encoder,
    ).eval()
    unet = UNet2DModel.from_pretrained(folder / "unet")
    schedule = Schedule.load(folder / "scheduler")
    if meta.get("train", {}).get("unet", {}).get("regression"):
        denoiser = RegressionDenoiser(unet, schedule.num_train_timesteps - 1).eval()
    else:
        denoiser = Denoiser(unet).eval()
    return Checkpoint(
        vae,
        denoiser,
        schedule,
        SamplingOptions(**meta["sampling"]),
        meta,
    )


def random_init(
    folder: str | Path, vae_cfg=None, unet_cfg=None, schedule: Schedule | None = None, seed: int = 0
) -> Path:
    """A random-weight checkpoint of the given geometry (tests, smoke builds)."""
    import torch

    from cxr_sr.train.models import (
        UNetConfig,
        VAEConfig,
        build_lr_encoder,
        build_unet,
        build_vae,
    )

    torch.manual_seed(seed)
    vae_cfg = vae_cfg or VAEConfig()
    unet_cfg = unet_cfg or UNetConfig()
    vae = ResidualVAE(
        build_vae(vae_cfg),
        1.0,
        vae_cfg.residual_scale,
        vae_cfg.residual,
        build_lr_encoder(vae_cfg),
    )
    channels, size, _ = latent_shape(vae_cfg)
    denoiser = Denoiser(build_unet(unet_cfg, channels, size))
    return save(folder, vae, denoiser, schedule or Schedule(), SamplingOptions())
