"""Typed training configuration: dataclasses, loaded from YAML over the defaults.

    cfg = load_config("train/configs/demo.yaml", ["vae.steps=100", "unet.model.channels=[32,64]"])

Layout of the YAML (every key optional; an unknown key is a ``ValueError`` naming it):

    seed, device, out, pretrained_vae, num_workers, scaling_batches, sample_count, device_items
    data:      train.data.DataConfig
    vae:       stage 1 (VAEStage): model (train.models.VAEConfig) + optimisation + loss weights
    unet:      stage 2 (UNetStage): model (train.models.UNetConfig) + optimisation + loss
    schedule:  cxr_sr.Schedule fields (kind, num_train_timesteps, prediction, ...)
    sampling:  cxr_sr.SamplingOptions fields (the serving defaults saved in the checkpoint)

The resolved config (``asdict``) is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxr_sr import SamplingOptions, Schedule
from cxr_sr.train.data import DataConfig
from cxr_sr.train.models import UNetConfig, VAEConfig

AMP_MODES = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
DIFFUSION_LOSSES = ("mse", "fft")


@dataclass
class StageConfig:
    """Optimisation of one training stage.

    Args:
        steps: optimizer steps (each over ``batch_size * grad_accum`` samples); 0 skips the stage.
        batch_size: micro-batch size per process.
        grad_accum: micro-batches accumulated per optimizer step.
        lr, weight_decay, betas: AdamW (Loshchilov & Hutter 2019).
        warmup_steps: linear learning-rate warm-up, then constant (cosine decay if ``cosine``).
        ema_decay: exponential moving average of the weights (0 disables; the final checkpoint
            holds the EMA weights), with the usual warm-up min(decay, (1 + k) / (10 + k)).
        amp: ``no``, ``bf16`` (autocast; works on CPU) or ``fp16`` (CUDA, with a GradScaler).
        optimizer: ``adamw`` or ``adamw8bit`` (bitsandbytes, CUDA only).
        grad_clip: max global gradient norm (0 disables).
        patch_size: train on random HR patches of this side (a multiple of 4 * the VAE
            factor; LR patches aligned with them), 0 = whole images. Both networks are
            convolutional, so patches cut the CPU cost (SR3 and SRDiff train on patches too).
        ckpt_every, log_every, sample_every: in optimizer steps (0 disables).
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    cosine: bool = False
    ema_decay: float = 0.999
    amp: str = "no"
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    patch_size: int = 0
    ckpt_every: int = 500
    log_every: int = 10
    sample_every: int = 0

    def validate(self, name: str) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"{name}: need steps >= 0, batch_size >= 1, grad_accum >= 1")
        if self.amp not in AMP_MODES:
            raise ValueError(f"{name}.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{name}.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{name}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.patch_size < 0 or self.patch_size % 16:
            raise ValueError(
                f"{name}.patch_size must be 0 or a multiple of 16, got {self.patch_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"{name}.lr must be > 0, got {self.lr}")


@dataclass
class VAEStage(StageConfig):
    """Stage 1: the residual AutoencoderKL.

    loss = l1 + ssim_weight * (1 - SSIM) + fft_weight * freq + kl_weight * KL, on
    recon = bicubic(LR) + D(z) / residual_scale against HR, z ~ q(z | HR) (Kingma & Welling
    2014; Rombach et al. 2022 for the small KL weight). ``zero_init_decoder`` zeroes the
    decoder's last conv so training starts from SR = bicubic.
    """

    model: VAEConfig = field(default_factory=VAEConfig)
    l1_weight: float = 1.0
    ssim_weight: float = 0.5
    fft_weight: float = 0.0
    fft_low_weight: float = 0.0
    fft_high_weight: float = 1.0
    fft_cutoff: float = 0.25
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    zero_init_decoder: bool = True


@dataclass
class UNetStage(StageConfig):
    """Stage 2: the LR-conditioned latent denoiser (VAE frozen).

    loss ``mse`` is ||f(x_t, t, z_lr) - target||^2 (Ho et al. 2020, eq. 14, for the schedule's
    parameterization); ``fft`` weights the same error in the 2-D Fourier domain, low and high
    radial frequencies separately (focal-frequency style, Jiang et al. 2021); with both weights
    1 it equals ``mse`` (Parseval). ``latent_cutmix`` is the probability of pasting a random
    box of another sample's (x0, z_lr) pair into each sample (Yun et al. 2019, on latents).

    ``pixel_weight`` adds a pixel-space term: the x0 estimate implied by the output is decoded
    by the frozen VAE decoder (gradients flow through it to the denoiser) and its squared
    error against HR, divided by bicubic's squared error on the same batch, is added with
    this weight. A latent MSE does not weigh latent directions by what they do to the image;
    this term does, so a ratio below 1 means the denoiser's estimate beats bicubic.
    ``pixel_max_t`` limits the term to timesteps t < pixel_max_t (0 = all): the low-noise
    steps that decide the final image.

    ``t_min`` draws training timesteps from [t_min, T) instead of [0, T): a model served
    with few steps from pure noise (the default: one step at t = T - 1) is trained where its
    sampler visits; more steps then visit timesteps it saw less of.

    ``regression`` trains the same network as a direct regression baseline for the ablation:
    input x_t = 0 at the fixed timestep T - 1, target the clean latent (x0 prediction only),
    so it predicts the HR latent from z_lr in one pass with no noise and no schedule.
    """

    model: UNetConfig = field(default_factory=UNetConfig)
    loss: str = "mse"
    fft_low_weight: float = 1.0
    fft_high_weight: float = 1.0
    fft_cutoff: float = 0.25
    latent_cutmix: float = 0.0
    pixel_weight: float = 0.0
    pixel_max_t: int = 0
    t_min: int = 0
    regression: bool = False


@dataclass
class TrainConfig:
    """Everything one training run needs; saved, resolved, into the checkpoint.

    Args:
        seed: seeds the weights, the data order and the diffusion noise.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        out: run folder (``state/`` for resumable state, ``checkpoint/`` for the final one).
        pretrained_vae: local folder of a trained AutoencoderKL (``save_pretrained`` layout or a
            checkpoint folder with ``vae/``, whose ``lr_encoder/`` comes along when it has one);
            stage 1 is then skipped. A 3-channel (SD) VAE is
            folded into an exact 1-channel one (gray replicated to RGB, output averaged). An
            image VAE (SD) decodes images, not residuals: set ``vae.model.residual: false``.
        pretrained_scaling: latent scaling of the pretrained VAE (0 = measure it).
        init_from: a checkpoint folder of the same architecture to fine-tune: its VAE, LR
            encoder, latent scaling and denoiser are loaded, stage 1 is skipped and stage 2
            continues training the denoiser (e.g. on your own data, or longer).
        scaling_batches: batches of HR images used to measure the latent std after stage 1.
        sample_count: validation images in the TensorBoard sample grids.
        device_items: 0 = the loader feeds every batch; N > 0 = N training pairs are drawn
            once through the loader and held on the training device, and every batch is a
            random draw of them (``train.batches.DevicePool``): for small data sets on a fast
            GPU, where the loader's workers set the pace. 16,000 pairs of 256x256 take 4 GiB.
    """

    seed: int = 0
    device: str = "auto"
    out: str = "runs/default"
    pretrained_vae: str | None = None
    pretrained_scaling: float = 0.0
    init_from: str | None = None
    num_workers: int = 0
    scaling_batches: int = 8
    sample_count: int = 4
    device_items: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStage = field(default_factory=VAEStage)
    unet: UNetStage = field(default_factory=lambda: UNetStage(lr=2e-4, ema_decay=0.999))
    schedule: Schedule = field(default_factory=Schedule)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def validate(self) -> None:
        self.vae.validate("vae")
        self.unet.validate("unet")
        if self.unet.loss not in DIFFUSION_LOSSES:
            raise ValueError(f"unet.loss must be one of {DIFFUSION_LOSSES}, got {self.unet.loss!r}")
        if self.unet.pixel_weight < 0 or self.unet.pixel_max_t < 0:
            raise ValueError("unet.pixel_weight and unet.pixel_max_t must be >= 0")
        if not 0 <= self.unet.t_min < self.schedule.num_train_timesteps:
            raise ValueError(
                f"unet.t_min must be in [0, {self.schedule.num_train_timesteps}), "
                f"got {self.unet.t_min}"
            )
        if self.unet.regression and self.schedule.prediction != "x0":
            raise ValueError("unet.regression needs schedule.prediction: x0")
        if not 0.0 <= self.unet.latent_cutmix <= 1.0:
            raise ValueError(f"unet.latent_cutmix must be in [0, 1], got {self.unet.latent_cutmix}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:i], got {self.device!r}")


# -- dict <-> dataclass --------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (dataclass, list, scalar, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in names:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ValueError(f"unknown config key {path!r} (known: {sorted(names)})")
    default = cls()
    kwargs = {}
    for name in names:
        path = f"{prefix}.{name}" if prefix else name
        if name in values:
            base = getattr(default, name)
            value = values[name]
            if dataclasses.is_dataclass(base) and isinstance(value, dict):
                merged = {**_as_dict(base), **value}  # partial nested mappings over defaults
                kwargs[name] = _from_dict(type(base), merged, path)
            else:
                kwargs[name] = _coerce(value, hints[name], path)
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


def _as_dict(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def to_dict(cfg: Any) -> dict:
    """Plain (JSON/YAML-safe) nested dict of a config."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"vae.steps=100"`` -> ("vae.steps", 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else None


def config_from_dict(values: dict, overrides: list[str] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested ``values`` over the defaults, then overrides."""
    tree = dict(values or {})
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    cfg = _from_dict(TrainConfig, _deep_copy(tree))
    cfg.validate()
    return cfg


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def load_config(yaml_path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file over the defaults, then ``key.path=value`` overrides; unknown keys raise."""
    values: dict = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        values = loaded or {}
    return config_from_dict(values, overrides)
