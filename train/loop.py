"""Training driver: stage 1 the residual VAE, stage 2 the latent denoiser (VAE frozen).

    python -m cxr_sr.train.loop --config train/configs/demo.yaml --out runs/demo [--resume]
                         [--set vae.steps=100 --set unet.lr=1e-4] [--device cpu]

Stage 1 (unless ``pretrained_vae``): z ~ q(z | HR), recon = bicubic(LR) + D(z) / residual_scale,
loss = L1 + w (1 - SSIM) [+ frequency term] + small KL (``train.losses.vae_loss``). Afterwards
``scaling`` = 1 / std of the latent means E(HR) (Rombach et al. 2022, sec. 4.3.2).

Stage 2: x0 = scaling * E(HR), z_lr = scaling * E(bicubic(LR)) (means), t ~ U{0..T-1},
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4); the denoiser
f(x_t, t, z_lr) regresses ``Schedule.target`` (eps, v or x0). With ``unet.pixel_weight`` > 0
the x0 implied by the output is also decoded by the frozen decoder and its squared error
against HR, relative to bicubic's, is added (``pixel_error_ratio``).

Resumable state lives in ``<out>/state/state.pt`` (weights, optimizer, LR schedule, EMA,
GradScaler, every RNG, the data position, stage and step): resuming continues bit for bit on
CPU. The final checkpoint (EMA weights, ``train.checkpoint`` layout) goes to ``<out>/checkpoint``.
Multi-GPU: ``accelerate launch -m cxr_sr.train.loop ...``; each process takes its slice of every
global batch from :class:`BatchStream`, and accelerate wraps the model and optimizer (DDP).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cxr_sr.train import checkpoint as ckpt
from cxr_sr.train.config import StageConfig, TrainConfig, load_config, to_dict
from cxr_sr.train.data import build_dataset
from cxr_sr.train.ema import EMA
from cxr_sr.train.losses import diffusion_loss, psnr, target_coefficients, vae_loss
from cxr_sr.train.models import Denoiser, ResidualVAE, bicubic, build_unet, build_vae
from torch.utils.data import DataLoader, Dataset

from cxr_sr import Schedule

STAGES = ("vae", "unet", "done")
# keys that may change between a run and its resume without breaking exactness
RESUME_MUTABLE = (
    "device",
    "out",
    "num_workers",
    "sampling",
    "steps",
    "ckpt_every",
    "log_every",
    "sample_every",
    "sample_count",
)


# -- data order ----------------------------------------------------------------------------


class EpochBatches:
    """Index batches of one epoch: a permutation seeded by SeedSequence([seed, salt, epoch]),
    cut into global batches of ``batch_size * world`` (the last partial one dropped); process
    ``rank`` takes every ``world``-th index of each, and the first ``skip`` batches are skipped
    (resuming mid-epoch)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        salt: int,
        epoch: int,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.salt, self.epoch = n, batch_size, seed, salt, epoch
        self.skip, self.rank, self.world = skip, rank, world

    def __len__(self) -> int:
        return max(0, self.n // (self.batch_size * self.world) - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        perm = np.random.default_rng([self.seed, self.salt, self.epoch]).permutation(self.n)
        size = self.batch_size * self.world
        for b in range(self.skip, self.n // size):
            yield perm[b * size : (b + 1) * size][self.rank :: self.world].tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    salt: int,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
) -> Iterator:
    """Infinite iterator of (hr, lr) micro-batches starting at micro-batch ``start``.

    The order is a pure function of (seed, salt, position), so a resumed run sees the batches
    the uninterrupted run would have seen; ``dataset.set_epoch(e)`` (when the dataset has it)
    is called before each epoch's iterator is built, which fixes its per-item randomness.
    """
    per_epoch = len(dataset) // (batch_size * world)
    if per_epoch < 1:
        raise ValueError(
            f"the training set has {len(dataset)} pairs, fewer than one global "
            f"batch of {batch_size * world}"
        )
    epoch, skip = divmod(start, per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batches = EpochBatches(len(dataset), batch_size, seed, salt, epoch, skip, rank, world)
        # own generator: building the iterator must not draw from the global torch RNG
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, salt, epoch]).generate_state(1)[0])
        )
        yield from DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers, generator=gen
        )
        epoch, skip = epoch + 1, 0


# -- helpers -------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def autocast(device: torch.device, amp: str):
    if amp == "no":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs CUDA (GradScaler); use amp=bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params, stage: StageConfig, log: Callable[[str], None]):
    kwargs = dict(lr=stage.lr, weight_decay=stage.weight_decay, betas=tuple(stage.betas))
    if stage.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            log("optimizer adamw8bit: bitsandbytes is not importable; falling back to torch AdamW")
    return torch.optim.AdamW(params, **kwargs)


def make_lr_schedule(optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.cosine and stage.steps > stage.warmup_steps:
            frac = (step - stage.warmup_steps) / (stage.steps - stage.warmup_steps)
            return 0.5 * (1.0 + np.cos(np.pi * min(frac, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state(gen: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "train": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["train"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> torch.Generator:
    """Seed the global RNGs (library code may use them) and return the training generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed + 1)


def gray_from_rgb(vae):
    """Fold a 3-channel AutoencoderKL into an exact 1-channel one.

    A gray image replicated to RGB through conv_in equals conv_in with its weights summed over
    the input channels; the mean of the RGB output equals conv_out with weights and bias
    averaged over the output channels.
    """
    from diffusers import AutoencoderKL

    cfg = dict(vae.config)
    if cfg["in_channels"] == 1 and cfg["out_channels"] == 1:
        return vae
    cfg.update(in_channels=1, out_channels=1)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    gray = AutoencoderKL.from_config(cfg)
    state = vae.state_dict()
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].sum(1, keepdim=True)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].mean(0, keepdim=True)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].mean(0, keepdim=True)
    gray.load_state_dict(state)
    return gray


def load_pretrained_vae(path: str):
    from diffusers import AutoencoderKL

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"pretrained_vae {path!r}: no AutoencoderKL config.json there")
    return gray_from_rgb(AutoencoderKL.from_pretrained(folder))


def random_patch(
    hr: torch.Tensor, lr: torch.Tensor, size: int, gen: torch.Generator, scale: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random aligned window for the whole batch: hr [N, 1, size, size] and the matching
    lr [N, 1, size/scale, size/scale] (offsets are multiples of 4 * scale); size 0 = no crop."""
    h, w = hr.shape[-2:]
    if size <= 0 or size >= min(h, w):
        return hr, lr
    step = 4 * scale
    y = int(torch.randint(0, (h - size) // step + 1, (1,), generator=gen)) * step
    x = int(torch.randint(0, (w - size) // step + 1, (1,), generator=gen)) * step
    ls = size // scale
    return (
        hr[..., y : y + size, x : x + size],
        lr[..., y // scale : y // scale + ls, x // scale : x // scale + ls],
    )


class VAEObjective(torch.nn.Module):
    """forward(hr, lr, noise) -> (recon, mean, logvar); one module so DDP sees a forward().

    hr [N, 1, 256, 256], lr [N, 1, 64, 64] in [0, 1]; noise [N, C, h, w] (None = posterior mean).
    """

    def __init__(self, rvae: ResidualVAE):
        super().__init__()
        self.rvae = rvae

    def forward(self, hr, lr, noise):
        dist = self.rvae.vae.encode(hr * 2.0 - 1.0).latent_dist
        z = dist.mean if noise is None else dist.mean + dist.std * noise
        recon = self.rvae.image(self.rvae.vae.decode(z).sample, lr)
        return recon, dist.mean, dist.logvar


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
    f = 256 // latent_shape[1]
    noise = None
    if s.sample_posterior:
        shape = (hr.shape[0], latent_shape[0], hr.shape[-2] // f, hr.shape[-1] // f)
        noise = torch.randn(shape, generator=gen).to(hr.device)
    recon, mean, logvar = model(hr, lr, noise)
    return vae_loss(
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
    t = torch.randint(0, cfg.schedule.num_train_timesteps, (n,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    view = lambda table: table[t].float().view(n, 1, 1, 1).to(x0.device)
    x_t = view(abar).sqrt() * x0 + (1.0 - view(abar)).sqrt() * eps
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


def atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_resume_config(saved: dict, current: dict, prefix: str = "") -> None:
    """Raise if a setting that decides the trajectory changed between run and resume."""
    for key in sorted(set(saved) | set(current)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if key in RESUME_MUTABLE:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            check_resume_config(a, b, path + ".")
        elif a != b:
            raise ValueError(f"cannot resume: {path} changed from {a!r} to {b!r}")


# -- the stage loop ------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything the two stages share within one process."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    accelerator: object
    gen: torch.Generator
    writer: object | None
    log: Callable[[str], None]
    progress: bool
    stop_after: int | None
    steps_taken: int = 0  # optimizer steps in this process (for stop_after)


def train_stage(
    run: Run,
    name: str,
    model: torch.nn.Module,
    dataset: Dataset,
    batch_loss: Callable,
    state: dict,
    extra_state: Callable[[], dict],
    on_sample: Callable[[int], None] | None,
) -> bool:
    """Train ``model`` for the stage's remaining steps; returns False if stopped early.

    ``state`` is the resumable state dict (mutated in place and saved at checkpoints).
    """
    cfg, acc = run.cfg, run.accelerator
    stage: StageConfig = getattr(cfg, name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, stage, run.log)
    sched = make_lr_schedule(optimizer, stage)
    ema = EMA(model, stage.ema_decay) if stage.ema_decay > 0 else None
    scaler = torch.amp.GradScaler("cuda", enabled=stage.amp == "fp16")
    step, position = 0, 0
    if state.get("stage") == name and "optimizer" in state:  # resuming mid-stage
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"], run.gen)
        step, position = state["step"], state["position"]
    model_p, optimizer_p = acc.prepare(model, optimizer)
    loader = make_loader(
        dataset,
        stage.batch_size,
        cfg.seed,
        salt=STAGES.index(name),
        start=position,
        rank=acc.process_index,
        world=acc.num_processes,
        num_workers=cfg.num_workers,
    )

    def save_state() -> None:
        if not acc.is_main_process:
            return
        state.update(
            stage=name,
            step=step,
            position=position,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            lr_schedule=sched.state_dict(),
            scaler=scaler.state_dict(),
            ema=ema.state_dict() if ema else None,
            rng=rng_state(run.gen),
            **extra_state(),
        )
        atomic_save(state, run.out / "state" / "state.pt")

    bar = None
    if run.progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=stage.steps, initial=step, desc=f"{name}", dynamic_ncols=True, mininterval=2.0
        )
    model_p.train()
    t0, step0 = time.perf_counter(), step
    while step < stage.steps:
        if run.stop_after is not None and run.steps_taken >= run.stop_after:
            save_state()
            if bar is not None:
                bar.close()
            return False
        optimizer_p.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        loss_sum = 0.0
        for micro in range(stage.grad_accum):
            hr, lr = next(loader)
            position += 1
            hr, lr = hr.to(run.device), lr.to(run.device)
            sync = micro + 1 == stage.grad_accum
            ctx = contextlib.nullcontext() if sync else acc.no_sync(model_p)
            with ctx:
                with autocast(run.device, stage.amp):
                    loss, parts = batch_loss(model_p, hr, lr)
                acc.backward(scaler.scale(loss / stage.grad_accum))
            loss_sum += float(loss.detach()) / stage.grad_accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / stage.grad_accum
        if stage.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        sched.step()
        if ema is not None:
            ema.update(model)
        step += 1
        run.steps_taken += 1
        if not np.isfinite(loss_sum):
            raise FloatingPointError(f"{name} loss is {loss_sum} at step {step}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4g}")
        if stage.log_every and step % stage.log_every == 0 and acc.is_main_process:
            rate = (time.perf_counter() - t0) / max(1, step - step0)
            run.log(
                f"{name} step {step}/{stage.steps} loss {loss_sum:.5g} "
                + " ".join(f"{k} {v:.4g}" for k, v in parts_sum.items())
                + f" lr {sched.get_last_lr()[0]:.3g} ({rate:.2f} s/step)"
            )
            if run.writer is not None:
                run.writer.add_scalar(f"{name}/loss", loss_sum, step)
                for k, v in parts_sum.items():
                    run.writer.add_scalar(f"{name}/{k}", v, step)
                run.writer.add_scalar(f"{name}/lr", sched.get_last_lr()[0], step)
        if on_sample and stage.sample_every and step % stage.sample_every == 0:
            on_sample(step)
            model_p.train()
        if stage.ckpt_every and step % stage.ckpt_every == 0:
            save_state()
    if bar is not None:
        bar.close()
    if ema is not None:  # the stage's result is the averaged weights
        ema.copy_to(model)
    state.pop("optimizer", None)
    return True


def _grid(*images: torch.Tensor) -> torch.Tensor:
    """Side by side [1, H, k*W] from k images [N, 1, H, W] (first row of each)."""
    rows = [
        torch.cat([im[i, 0].clamp(0, 1) for im in images], dim=1) for i in range(images[0].shape[0])
    ]
    return torch.cat(rows, dim=0)[None].cpu()


def run_training(
    cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True
) -> Path | None:
    """Train both stages; returns the final checkpoint folder, or None if stopped early."""
    from accelerate import Accelerator

    out = Path(cfg.out)
    want = resolve_device(cfg.device)
    acc = Accelerator(cpu=want.type == "cpu", mixed_precision="no")
    device = acc.device
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if acc.is_main_process:
            print(msg, flush=True)

    state_path = out / "state" / "state.pt"
    state: dict = {}
    cfg_dict = to_dict(cfg)
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        check_resume_config(state["config"], cfg_dict)
        log(f"resuming {state['stage']} at step {state['step']} from {state_path}")
    elif resume:
        log(f"no state at {state_path}; starting fresh")
    state["config"] = cfg_dict

    gen = seed_everything(cfg.seed)
    writer = None
    if acc.is_main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        except ImportError:
            log("tensorboard is not installed; scalars go to stdout only")
    run = Run(cfg, out, device, acc, gen, writer, log, progress, stop_after)

    # models (built from the seed even when resuming, then overwritten by the state)
    if cfg.pretrained_vae:
        vae = load_pretrained_vae(cfg.pretrained_vae)
    else:
        vae = build_vae(cfg.vae.model)
        if cfg.vae.zero_init_decoder:
            torch.nn.init.zeros_(vae.decoder.conv_out.weight)
            torch.nn.init.zeros_(vae.decoder.conv_out.bias)
    rvae = ResidualVAE(vae, 1.0, cfg.vae.model.residual_scale, cfg.vae.model.residual).to(device)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, 256 // f, 256 // f)
    unet = build_unet(cfg.unet.model, latent_shape[0], latent_shape[1])
    denoiser = Denoiser(unet).to(device)

    train_set = build_dataset(cfg.data, split="train")
    val_set = build_dataset(cfg.data, split="val")
    n_val = min(cfg.sample_count, len(val_set))
    val = [val_set[i] for i in range(n_val)]
    val_hr = torch.stack([v[0] for v in val]).to(device) if n_val else None
    val_lr = torch.stack([v[1] for v in val]).to(device) if n_val else None
    log(
        f"device {device}; train {len(train_set)} / val {len(val_set)} pairs; "
        f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
        f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, latent {latent_shape}"
    )

    stage = state.get("stage", "vae")
    if cfg.pretrained_vae and stage == "vae":
        stage = "unet"
        state.update(stage="unet", step=0, position=0)

    # -- stage 1 --
    if stage == "vae":
        objective = VAEObjective(rvae)

        @torch.no_grad()
        def sample_vae(step: int) -> None:
            if writer is None or val_hr is None:
                return
            objective.eval()
            recon, _, _ = objective(val_hr, val_lr, None)
            writer.add_image("vae/bicubic|recon|hr", _grid(bicubic(val_lr), recon, val_hr), step)
            writer.add_scalar("vae/val_psnr", float(psnr(recon.clamp(0, 1), val_hr).mean()), step)

        done = train_stage(
            run,
            "vae",
            objective,
            train_set,
            lambda m, hr, lr: vae_batch_loss(m, hr, lr, gen, cfg, latent_shape),
            state,
            lambda: {},
            sample_vae,
        )
        if not done:
            return None
        rvae.eval().requires_grad_(False)
        rvae.scaling = measure_scaling(
            rvae, train_set, cfg.scaling_batches, cfg.vae.batch_size, cfg.seed, device
        )
        log(f"VAE done; latent scaling {rvae.scaling:.5g}")
        state.update(
            stage="unet",
            step=0,
            position=0,
            vae=rvae.vae.state_dict(),
            scaling=rvae.scaling,
            rng=rng_state(gen),
        )
        for key in ("model", "ema", "lr_schedule", "scaler"):
            state.pop(key, None)
        if acc.is_main_process:
            atomic_save(state, state_path)
    else:
        if "vae" in state:
            rvae.vae.load_state_dict(state["vae"])
        if "scaling" in state:
            rvae.scaling = float(state["scaling"])
        if stage == "unet" and "optimizer" not in state and "rng" in state:
            set_rng_state(state["rng"], gen)  # stage 2 not started yet
        if "scaling" not in state:  # pretrained VAE, first start
            rvae.eval().requires_grad_(False)
            rvae.scaling = cfg.pretrained_scaling or measure_scaling(
                rvae, train_set, cfg.scaling_batches, cfg.vae.batch_size, cfg.seed, device
            )
            log(f"pretrained VAE; latent scaling {rvae.scaling:.5g}")
            state.update(vae=rvae.vae.state_dict(), scaling=rvae.scaling)
    rvae.eval().requires_grad_(False)

    # -- stage 2 --
    schedule: Schedule = cfg.schedule
    abar = torch.from_numpy(schedule.alphas_cumprod())
    c_x0, c_eps = target_coefficients(schedule)
    tables = (abar, c_x0, c_eps)
    if state.get("stage") != "done":

        @torch.no_grad()
        def sample_unet(step: int) -> None:
            if writer is None or val_hr is None:
                return
            from cxr_sr.train.evaluate import super_resolve

            denoiser.eval()
            sr = super_resolve(rvae, denoiser, schedule, cfg.sampling, val_lr, seed=0)
            writer.add_image("unet/bicubic|sr|hr", _grid(bicubic(val_lr), sr, val_hr), step)
            writer.add_scalar("unet/val_psnr", float(psnr(sr, val_hr).mean()), step)

        done = train_stage(
            run,
            "unet",
            denoiser,
            train_set,
            lambda m, hr, lr: diffusion_batch_loss(m, rvae, hr, lr, gen, cfg, tables),
            state,
            lambda: {"vae": rvae.vae.state_dict(), "scaling": rvae.scaling},
            sample_unet,
        )
        if not done:
            return None
        state.update(stage="done", step=0, unet=denoiser.state_dict())
        for key in ("model", "ema", "lr_schedule", "scaler", "optimizer"):
            state.pop(key, None)
        if acc.is_main_process:
            atomic_save(state, state_path)
    else:
        denoiser.load_state_dict(state["unet"])

    final = out / "checkpoint"
    if acc.is_main_process:
        ckpt.save(final, rvae, denoiser.eval(), schedule, cfg.sampling, train_config=cfg_dict)
        log(f"checkpoint written to {final}")
    if writer is not None:
        writer.close()
    acc.wait_for_everyone()
    return final


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cxr_sr.train.loop",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config over the defaults (train/configs/*.yaml)")
    p.add_argument("--out", help="run folder (overrides the config's `out`)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set vae.steps=100 (repeatable)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (overrides the config)")
    p.add_argument(
        "--resume", action="store_true", help="continue from <out>/state/state.pt when it exists"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="save state and exit after this many optimizer steps in this process "
        "(counted over both stages; simulates preemption)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.device:
        overrides.append(f"device={args.device}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    t0 = time.perf_counter()
    final = run_training(
        cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress
    )
    took = time.perf_counter() - t0
    print(f"{'finished' if final else 'stopped'} in {took:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
