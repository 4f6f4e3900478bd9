"""The training driver on the debug config: a loadable checkpoint; losses fall on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxr_sr.train import checkpoint
from cxr_sr.train.config import load_config, to_dict
from cxr_sr.train.data import build_dataset
from cxr_sr.train.loop import run_training
from cxr_sr.train.losses import target_coefficients
from cxr_sr.train.models import (
    Denoiser,
    ResidualVAE,
    UNetConfig,
    VAEConfig,
    build_unet,
    build_vae,
)
from cxr_sr.train.objectives import VAEObjective, diffusion_batch_loss, vae_batch_loss

DEBUG = Path(__file__).resolve().parents[1] / "train" / "configs" / "debug.yaml"


@pytest.mark.slow
def test_debug_run_writes_loadable_checkpoint(tmp_path):
    cfg = load_config(
        DEBUG,
        [
            f"out={tmp_path / 'run'}",
            "vae.steps=2",
            "unet.steps=2",
            "vae.sample_every=1",
            "unet.sample_every=2",
        ],
    )
    final = run_training(cfg, progress=False)
    assert final == tmp_path / "run" / "checkpoint"
    ck = checkpoint.load(final)
    assert ck.meta["train"] == to_dict(cfg)
    assert ck.schedule == cfg.schedule and ck.sampling == cfg.sampling
    assert ck.vae.scaling > 0 and ck.vae.scaling != 1.0
    assert ck.latent_shape == (2, 64, 64)
    assert (tmp_path / "run" / "state" / "state.pt").is_file()
    lr = torch.rand(1, 1, 64, 64)
    z = ck.vae.encode_lr(lr)
    out = ck.denoiser(z, torch.tensor([3.0]), z)
    assert out.shape == z.shape and torch.isfinite(out).all()


def _fixed_batch(cfg):
    ds = build_dataset(cfg.data, "train")
    hr = torch.stack([ds[i][0] for i in range(2)])
    lr = torch.stack([ds[i][1] for i in range(2)])
    return hr, lr


def _fit(model, loss_fn, steps=12, lr=2e-3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_vae_loss_decreases_on_fixed_batch():
    cfg = load_config(DEBUG, ["vae.patch_size=0"])
    hr, lr = _fixed_batch(cfg)
    torch.manual_seed(0)
    rvae = ResidualVAE(build_vae(cfg.vae.model), 1.0, cfg.vae.model.residual_scale)
    model = VAEObjective(rvae)

    def loss_fn():
        gen = torch.Generator().manual_seed(0)  # same posterior noise every step
        return vae_batch_loss(model, hr, lr, gen, cfg, (2, 64, 64))

    losses = _fit(model, loss_fn)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("pixel_weight", [0.0, 1.0])
def test_diffusion_loss_decreases_on_fixed_batch(pixel_weight):
    cfg = load_config(
        DEBUG,
        [
            "unet.patch_size=0",
            "unet.latent_cutmix=0",
            f"unet.pixel_weight={pixel_weight}",
            "unet.pixel_max_t=60",
        ],
    )
    hr, lr = _fixed_batch(cfg)
    torch.manual_seed(0)
    rvae = ResidualVAE(build_vae(cfg.vae.model), 1.0, 4.0).eval().requires_grad_(False)
    denoiser = Denoiser(build_unet(cfg.unet.model, 2, 64))
    c_x0, c_eps = target_coefficients(cfg.schedule)
    tables = (torch.from_numpy(cfg.schedule.alphas_cumprod()), c_x0, c_eps)
    ratios = []

    def loss_fn():
        gen = torch.Generator().manual_seed(0)  # same t and noise every step
        loss, parts = diffusion_batch_loss(denoiser, rvae, hr, lr, gen, cfg, tables)
        ratios.append(parts.get("pixel_ratio"))
        return loss, parts

    losses = _fit(denoiser, loss_fn)
    assert losses[-1] < 0.8 * losses[0], losses
    if pixel_weight:  # the decoded error relative to bicubic falls too
        assert ratios[-1] < ratios[0], ratios
    else:
        assert ratios == [None] * len(ratios)


def test_pixel_term_is_relative_to_bicubic_and_trains_only_the_denoiser():
    from cxr_sr.train.objectives import pixel_error_ratio

    cfg = load_config(DEBUG)
    hr, lr = _fixed_batch(cfg)
    torch.manual_seed(0)
    rvae = ResidualVAE(build_vae(cfg.vae.model), 1.0, 4.0).eval().requires_grad_(False)
    last = rvae.vae.decoder.conv_out
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)  # decoder output 0: SR is exactly bicubic
    z = torch.randn(2, 2, 64, 64, requires_grad=True)
    ratio = pixel_error_ratio(rvae, z, hr, lr)
    assert abs(float(ratio.detach()) - 1.0) < 1e-6
    torch.nn.init.constant_(last.bias, 0.05)  # a constant offset can only add error
    ratio = pixel_error_ratio(rvae, z, hr, lr)
    assert float(ratio.detach()) > 1.0
    ratio.backward()
    assert z.grad is not None and all(p.grad is None for p in rvae.parameters())


def test_plain_vae_variant_round_trips(tmp_path):
    vcfg = VAEConfig(
        channels=[8, 8], latent_channels=2, norm_groups=4, residual=False, lr_encoder=[]
    )
    folder = checkpoint.random_init(
        tmp_path / "ck", vcfg, UNetConfig(channels=[16, 16], norm_groups=4)
    )
    ck = checkpoint.load(folder)
    assert ck.meta["residual"] is False and not ck.vae.is_residual
    z = torch.randn(1, 2, 128, 128)
    raw = ck.vae.vae.decode(z).sample
    expect = ((raw + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(ck.vae.decode(z, torch.rand(1, 1, 64, 64)), expect)


def test_rgb_vae_from_a_local_folder_folds_into_an_exact_gray_one(tmp_path):
    """An SD-style 3-channel AutoencoderKL saved locally loads as a 1-channel VAE whose
    encoder sees gray replicated to RGB and whose decoder output is the RGB mean."""
    from diffusers import AutoencoderKL

    from cxr_sr.train.pretrained import load_pretrained_vae

    torch.manual_seed(0)
    rgb = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    ).eval()
    rgb.save_pretrained(tmp_path / "sd_vae")
    gray = load_pretrained_vae(str(tmp_path / "sd_vae")).eval()
    assert (gray.config.in_channels, gray.config.out_channels) == (1, 1)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        want_z = rgb.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean
        got_z = gray.encode(x).latent_dist.mean
        torch.testing.assert_close(got_z, want_z, atol=1e-5, rtol=1e-5)
        want = rgb.decode(want_z).sample.mean(1, keepdim=True)
        torch.testing.assert_close(gray.decode(got_z).sample, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained_vae(str(tmp_path / "nothing"))
