"""Training driver: stage 1 the residual VAE, stage 2 the latent denoiser (VAE frozen).

    python -m cxr_sr.train.loop --config train/configs/demo.yaml --out runs/demo [--resume]
                         [--set vae.steps=100 --set unet.lr=1e-4] [--device cpu]

Stage 1 trains the residual VAE (unless ``pretrained_vae``) and measures its latent scaling;
stage 2 trains the latent denoiser on the frozen VAE. The final checkpoint (EMA weights,
``train.checkpoint`` layout) goes to ``<out>/checkpoint``; resumable state to
``<out>/state/state.pt`` (resuming continues bit for bit on CPU). Multi-GPU:
``accelerate launch -m cxr_sr.train.loop ...``.

Where things live:

    train.objectives  what each stage minimises (VAE objective, diffusion loss, pixel term,
                      latent CutMix, latent scaling)
    train.batches     data order (resumable, per process) and random aligned patches
    train.state       RNGs, optimizer / LR schedule / EMA / GradScaler, resume checks, saving
    train.trainer     the optimisation loop of one stage (run_loop / run_step / forward_backward)
    train.pretrained  a pretrained diffusers AutoencoderKL as the 1-channel VAE
    train.pipeline    the offline SR pipeline (the validation samples; also train.evaluate)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cxr_sr import Schedule
from cxr_sr.train import checkpoint as ckpt
from cxr_sr.train.config import TrainConfig, load_config, to_dict
from cxr_sr.train.data import build_dataset
from cxr_sr.train.losses import psnr, target_coefficients
from cxr_sr.train.models import (
    Denoiser,
    ResidualVAE,
    bicubic,
    build_lr_encoder,
    build_unet,
    build_vae,
    latent_shape,
)
from cxr_sr.train.objectives import (
    VAEObjective,
    diffusion_batch_loss,
    measure_scaling,
    vae_batch_loss,
)
from cxr_sr.train.pretrained import load_pretrained_vae
from cxr_sr.train.state import (
    check_resume_config,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from cxr_sr.train.trainer import Run, train_stage


@dataclasses.dataclass
class Data:
    train: Dataset
    val_hr: torch.Tensor | None  # the first ``sample_count`` validation pairs, on the device
    val_lr: torch.Tensor | None


def _grid(*images: torch.Tensor) -> torch.Tensor:
    """Side by side [1, H, k*W] from k images [N, 1, H, W] (first row of each)."""
    rows = [
        torch.cat([im[i, 0].clamp(0, 1) for im in images], dim=1) for i in range(images[0].shape[0])
    ]
    return torch.cat(rows, dim=0)[None].cpu()


# -- setup ---------------------------------------------------------------------------------


def open_run(
    cfg: TrainConfig, resume: bool, stop_after: int | None, progress: bool
) -> tuple[Run, dict]:
    """Accelerator, resumable state (checked against ``cfg``), seeded RNGs and the writer."""
    from accelerate import Accelerator

    out = Path(cfg.out)
    want = resolve_device(cfg.device)
    acc = Accelerator(cpu=want.type == "cpu", mixed_precision="no")
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
    return Run(cfg, out, acc.device, acc, gen, writer, log, progress, stop_after), state


def build_models(cfg: TrainConfig, device: torch.device):
    """(ResidualVAE, Denoiser, latent shape of a 256 image), built from the seeded RNG."""
    if cfg.pretrained_vae:
        vae = load_pretrained_vae(cfg.pretrained_vae)
    else:
        vae = build_vae(cfg.vae.model)
        if cfg.vae.zero_init_decoder:
            torch.nn.init.zeros_(vae.decoder.conv_out.weight)
            torch.nn.init.zeros_(vae.decoder.conv_out.bias)
    # a pretrained VAE skips stage 1, where the LR encoder would learn: it comes with the VAE
    # (a checkpoint folder's lr_encoder/), or z_lr is the VAE's latent of bicubic(LR)
    if cfg.pretrained_vae:
        lr_encoder = ckpt.load_lr_encoder(cfg.pretrained_vae)
    else:
        lr_encoder = build_lr_encoder(cfg.vae.model)
    rvae = ResidualVAE(
        vae, 1.0, cfg.vae.model.residual_scale, cfg.vae.model.residual, lr_encoder
    ).to(device)
    shape = latent_shape(vae)
    unet = build_unet(cfg.unet.model, shape[0], shape[1])
    return rvae, Denoiser(unet).to(device), shape


def load_data(cfg: TrainConfig, device: torch.device) -> tuple[Data, int]:
    """The training set and the first validation pairs; also the validation set's size."""
    train_set = build_dataset(cfg.data, split="train")
    val_set = build_dataset(cfg.data, split="val")
    n_val = min(cfg.sample_count, len(val_set))
    val = [val_set[i] for i in range(n_val)]
    val_hr = torch.stack([v[0] for v in val]).to(device) if n_val else None
    val_lr = torch.stack([v[1] for v in val]).to(device) if n_val else None
    return Data(train_set, val_hr, val_lr), len(val_set)


# -- the two stages ------------------------------------------------------------------------


def vae_stage(run: Run, state: dict, rvae: ResidualVAE, data: Data, latent_shape) -> bool:
    """Stage 1 (or, after it or with a pretrained VAE, restoring its result); leaves the VAE
    frozen with its latent scaling. Returns False if stopped early."""
    cfg = run.cfg
    stage = state.get("stage", "vae")
    if cfg.pretrained_vae and stage == "vae":
        stage = "unet"
        state.update(stage="unet", step=0, position=0)
    if stage != "vae":
        restore_vae(run, state, rvae, data)
        return True
    objective = VAEObjective(rvae)

    @torch.no_grad()
    def sample_vae(step: int) -> None:
        if run.writer is None or data.val_hr is None:
            return
        objective.eval()
        recon = objective(data.val_hr, data.val_lr, None)[0]
        grid = _grid(bicubic(data.val_lr), recon, data.val_hr)
        run.writer.add_image("vae/bicubic|recon|hr", grid, step)
        val_psnr = float(psnr(recon.clamp(0, 1), data.val_hr).mean())
        run.writer.add_scalar("vae/val_psnr", val_psnr, step)

    done = train_stage(
        run,
        "vae",
        objective,
        data.train,
        lambda m, hr, lr: vae_batch_loss(m, hr, lr, run.gen, cfg, latent_shape),
        state,
        lambda: {},
        sample_vae,
    )
    if not done:
        return False
    rvae.eval().requires_grad_(False)
    rvae.scaling = measure_scaling(
        rvae, data.train, cfg.scaling_batches, cfg.vae.batch_size, cfg.seed, run.device
    )
    run.log(f"VAE done; latent scaling {rvae.scaling:.5g}")
    state.update(
        stage="unet",
        step=0,
        position=0,
        **frozen_vae_state(rvae),
        rng=rng_state(run.gen),
    )
    for key in ("model", "ema", "lr_schedule", "scaler"):
        state.pop(key, None)
    run.save(state)
    return True


def init_from_checkpoint(run: Run, state: dict, rvae: ResidualVAE, denoiser: Denoiser) -> None:
    """Load ``cfg.init_from`` (same architecture) and start at stage 2 with its VAE frozen."""
    source = ckpt.load(run.cfg.init_from)
    try:  # strict loads: any missing, extra or reshaped weight (LR encoder included) refuses
        rvae.load_state_dict(source.vae.state_dict())
        denoiser.load_state_dict(source.denoiser.state_dict())
    except RuntimeError as err:
        raise ValueError(
            f"init_from={run.cfg.init_from}: its architecture differs from this config's: {err}"
        ) from None
    rvae.scaling = source.vae.scaling
    state.update(stage="unet", step=0, position=0, **frozen_vae_state(rvae))
    run.log(f"initialised from {run.cfg.init_from}; latent scaling {rvae.scaling:.5g}")


def frozen_vae_state(rvae: ResidualVAE) -> dict:
    """What stage 2 keeps of stage 1: the VAE (and LR encoder) weights and the scaling."""
    out = {"vae": rvae.vae.state_dict(), "scaling": rvae.scaling}
    if rvae.lr_encoder is not None:
        out["lr_encoder"] = rvae.lr_encoder.state_dict()
    return out


def restore_vae(run: Run, state: dict, rvae: ResidualVAE, data: Data) -> None:
    """Stage 1 already done (or skipped): load its VAE and scaling, or measure the scaling of
    a pretrained VAE on its first start."""
    cfg = run.cfg
    if "vae" in state:
        rvae.vae.load_state_dict(state["vae"])
    if "lr_encoder" in state and rvae.lr_encoder is not None:
        rvae.lr_encoder.load_state_dict(state["lr_encoder"])
    if "scaling" in state:
        rvae.scaling = float(state["scaling"])
    if state.get("stage") == "unet" and "optimizer" not in state and "rng" in state:
        set_rng_state(state["rng"], run.gen)  # stage 2 not started yet
    if "scaling" not in state:  # pretrained VAE, first start
        rvae.eval().requires_grad_(False)
        rvae.scaling = cfg.pretrained_scaling or measure_scaling(
            rvae, data.train, cfg.scaling_batches, cfg.vae.batch_size, cfg.seed, run.device
        )
        run.log(f"pretrained VAE; latent scaling {rvae.scaling:.5g}")
        state.update(frozen_vae_state(rvae))


def unet_stage(run: Run, state: dict, rvae: ResidualVAE, denoiser: Denoiser, data: Data) -> bool:
    """Stage 2: the latent denoiser on the frozen VAE. Returns False if stopped early."""
    if state.get("stage") == "done":
        denoiser.load_state_dict(state["unet"])
        return True
    cfg = run.cfg
    schedule: Schedule = cfg.schedule
    abar = torch.from_numpy(schedule.alphas_cumprod())
    c_x0, c_eps = target_coefficients(schedule)
    tables = (abar, c_x0, c_eps)

    @torch.no_grad()
    def sample_unet(step: int) -> None:
        if run.writer is None or data.val_hr is None:
            return
        from cxr_sr.train.pipeline import super_resolve

        denoiser.eval()
        sr = super_resolve(rvae, denoiser, schedule, cfg.sampling, data.val_lr, seed=0)
        run.writer.add_image(
            "unet/bicubic|sr|hr", _grid(bicubic(data.val_lr), sr, data.val_hr), step
        )
        run.writer.add_scalar("unet/val_psnr", float(psnr(sr, data.val_hr).mean()), step)

    done = train_stage(
        run,
        "unet",
        denoiser,
        data.train,
        lambda m, hr, lr: diffusion_batch_loss(m, rvae, hr, lr, run.gen, cfg, tables),
        state,
        lambda: frozen_vae_state(rvae),
        sample_unet,
    )
    if not done:
        return False
    state.update(stage="done", step=0, unet=denoiser.state_dict())
    for key in ("model", "ema", "lr_schedule", "scaler", "optimizer"):
        state.pop(key, None)
    run.save(state)
    return True


def run_training(
    cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True
) -> Path | None:
    """Train both stages; returns the final checkpoint folder, or None if stopped early."""
    run, state = open_run(cfg, resume, stop_after, progress)
    # models (built from the seed even when resuming, then overwritten by the state)
    rvae, denoiser, latent_shape = build_models(cfg, run.device)
    if cfg.init_from and "stage" not in state:  # a fresh fine-tuning run
        init_from_checkpoint(run, state, rvae, denoiser)
    data, n_val = load_data(cfg, run.device)
    run.log(
        f"device {run.device}; train {len(data.train)} / val {n_val} pairs; "
        f"VAE {sum(p.numel() for p in rvae.vae.parameters()) / 1e6:.2f}M, "
        f"UNet {sum(p.numel() for p in denoiser.unet.parameters()) / 1e6:.2f}M, "
        f"latent {latent_shape}"
    )
    if not vae_stage(run, state, rvae, data, latent_shape):
        return None
    rvae.eval().requires_grad_(False)
    if not unet_stage(run, state, rvae, denoiser, data):
        return None

    final = run.out / "checkpoint"
    if run.accelerator.is_main_process:
        ckpt.save(
            final, rvae, denoiser.eval(), cfg.schedule, cfg.sampling, train_config=state["config"]
        )
        run.log(f"checkpoint written to {final}")
    if run.writer is not None:
        run.writer.close()
    run.accelerator.wait_for_everyone()
    return final


# -- command line --------------------------------------------------------------------------


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
