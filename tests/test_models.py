"""The any-size networks: the LR encoder (distillation, locality), no whole-latent attention,
and the direct-regression baseline of the ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from cxr_sr.train import checkpoint
from cxr_sr.train.config import load_config
from cxr_sr.train.models import (
    LREncoder,
    ResidualVAE,
    UNetConfig,
    VAEConfig,
    bicubic,
    build_lr_encoder,
    build_vae,
)
from cxr_sr.train.objectives import VAEObjective, diffusion_batch_loss, vae_batch_loss

DEBUG = Path(__file__).resolve().parents[1] / "train" / "configs" / "debug.yaml"


def _rvae(**kw) -> ResidualVAE:
    torch.manual_seed(0)
    cfg = VAEConfig(channels=[8, 8, 16], latent_channels=2, norm_groups=4, **kw)
    return ResidualVAE(build_vae(cfg), 0.5, 4.0, True, build_lr_encoder(cfg))


class Spy(torch.nn.Module):
    """A denoiser that records its (x_t, t) inputs and returns its conditioning."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, z_lr):
        self.seen.append((x_t.detach().clone(), t.detach().clone()))
        return self.w * z_lr


def _diffusion_loss(denoiser, cfg, n: int):
    from cxr_sr.train.losses import target_coefficients

    abar = torch.from_numpy(cfg.schedule.alphas_cumprod())
    tables = (abar, *target_coefficients(cfg.schedule))
    hr = torch.rand(n, 1, 64, 64)
    lr = bicubic(hr)[..., ::16, ::16]
    gen = torch.Generator().manual_seed(0)
    return diffusion_batch_loss(denoiser, _rvae(), hr, lr, gen, cfg, tables)


def test_default_vae_has_no_attention_and_an_lr_encoder():
    rvae = _rvae()
    assert not any(isinstance(m, Attention) for m in rvae.modules())
    assert isinstance(rvae.lr_encoder, LREncoder)
    first = _rvae(mid_attention=True, lr_encoder=[])
    assert any(isinstance(m, Attention) for m in first.modules())
    assert first.lr_encoder is None


def test_unet_mid_attention_is_a_switch():
    from cxr_sr.builders.graphs import attention_bytes
    from cxr_sr.train.models import Denoiser, build_unet

    cfg = UNetConfig(channels=[8, 16], norm_groups=4)
    with_att = Denoiser(build_unet(cfg, 2, 16)).eval()
    linear = Denoiser(
        build_unet(UNetConfig(channels=[8, 16], norm_groups=4, mid_attention=False), 2, 16)
    )
    assert any(isinstance(m, Attention) for m in with_att.modules())
    assert not any(isinstance(m, Attention) for m in linear.modules())
    rvae = _rvae().eval()
    small, large = (attention_bytes(rvae, with_att, s)["unet"] for s in (32, 64))
    assert large == 16 * small > 0  # quadratic: 4x the pixels, 16x the matrix
    assert attention_bytes(rvae, linear.eval(), 64)["unet"] == 0


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (2, 1, 20, 36), (1, 1, 33, 17)])
def test_any_size_shapes(shape):
    rvae = _rvae().eval()
    lr = torch.rand(shape)
    with torch.no_grad():
        z = rvae.encode_lr(lr)
        assert z.shape == (shape[0], 2, shape[2], shape[3])  # f = 4: the latent is LR-sized
        if shape[2] % 2 == 0 and shape[3] % 4 == 0:  # the VAE decoder halves twice
            sr = rvae.decode(z, lr)
            assert sr.shape == (shape[0], 1, 4 * shape[2], 4 * shape[3])


def test_lr_encoder_is_local_so_tiles_match_the_whole_image():
    """No normalisation over the image: away from the borders, a crop's code equals the
    whole image's code at the same place."""
    enc = _rvae().lr_encoder.eval()
    lr = torch.rand(1, 1, 48, 48)
    with torch.no_grad():
        whole = enc(lr)
        tile = enc(lr[..., 8:40, 8:40])
    margin = 6  # receptive field of the encoder's 3x3 convolutions
    torch.testing.assert_close(
        tile[..., margin:-margin, margin:-margin],
        whole[..., 8 + margin : 40 - margin, 8 + margin : 40 - margin],
    )


def test_lr_encoder_distillation_trains_only_the_lr_encoder():
    rvae = _rvae()
    lr = torch.rand(2, 1, 16, 16)
    loss = rvae.lr_encoder_loss(lr)
    loss.backward()
    assert all(p.grad is None for p in rvae.vae.parameters())
    assert all(p.grad is not None for p in rvae.lr_encoder.parameters())
    target = rvae.vae.encode(bicubic(lr) * 2 - 1).latent_dist.mean
    torch.testing.assert_close(loss, torch.mean((rvae.lr_encoder(lr) - target) ** 2))
    assert rvae.encode_lr(lr).shape == target.shape


def test_vae_stage_loss_includes_the_distillation():
    cfg = load_config(DEBUG, ["vae.patch_size=0"])
    rvae = _rvae()
    hr = torch.rand(2, 1, 64, 64)
    lr = bicubic(hr)[..., ::16, ::16]
    _, parts = vae_batch_loss(VAEObjective(rvae), hr, lr, torch.Generator(), cfg, (2, 64, 64))
    assert parts["lr_encoder_mse"] > 0
    rvae.lr_encoder = None
    _, parts = vae_batch_loss(VAEObjective(rvae), hr, lr, torch.Generator(), cfg, (2, 64, 64))
    assert "lr_encoder_mse" not in parts


def test_regression_baseline_sees_no_noise(tmp_path):
    cfg = load_config(
        DEBUG, ["unet.regression=true", "schedule.prediction=x0", "unet.patch_size=0"]
    )
    spy = Spy()
    loss, _ = _diffusion_loss(spy, cfg, n=3)
    assert torch.isfinite(loss)
    x_t, t = spy.seen[0]
    assert torch.count_nonzero(x_t) == 0
    assert torch.all(t == cfg.schedule.num_train_timesteps - 1)
    with pytest.raises(ValueError, match="regression needs"):
        load_config(DEBUG, ["unet.regression=true", "schedule.prediction=v"])


def test_regression_checkpoint_is_sampled_as_trained(tmp_path):
    """A regression checkpoint loads behind the denoiser interface with its training input
    (x_t = 0, t = T - 1), so samplers and exports see what it learned, whatever noise they
    pass."""
    from cxr_sr.train.models import RegressionDenoiser

    folder = checkpoint.random_init(tmp_path / "ck")
    meta_path = folder / checkpoint.META
    meta = json.loads(meta_path.read_text())
    meta.setdefault("train", {})["unet"] = {"regression": True}
    meta_path.write_text(json.dumps(meta))
    ck = checkpoint.load(folder)
    assert isinstance(ck.denoiser, RegressionDenoiser)
    c, h, w = ck.latent_shape
    z_lr = torch.randn(1, c, h // 4, w // 4)
    with torch.no_grad():
        a = ck.denoiser(torch.randn_like(z_lr), torch.tensor([3.0]), z_lr)
        b = ck.denoiser(torch.randn_like(z_lr), torch.tensor([250.0]), z_lr)
        plain = ck.denoiser.unet(
            torch.cat([torch.zeros_like(z_lr), z_lr], 1),
            torch.tensor([float(ck.schedule.num_train_timesteps - 1)]),
        ).sample
    assert torch.equal(a, b) and torch.allclose(a, plain)


def test_checkpoint_round_trips_the_lr_encoder(tmp_path):
    folder = checkpoint.random_init(
        tmp_path / "ck",
        VAEConfig(channels=[8, 16, 16], norm_groups=4),
        UNetConfig(channels=[16, 32], norm_groups=8),
    )
    assert (folder / "lr_encoder" / "config.json").is_file()
    a, b = checkpoint.load(folder), checkpoint.load(folder)
    lr = torch.rand(1, 1, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(a.vae.encode_lr(lr), b.vae.encode_lr(lr))


@pytest.mark.slow
def test_init_from_fine_tunes_the_denoiser_only(tmp_path):
    from cxr_sr.train.loop import run_training

    base = ["vae.steps=2", "unet.steps=2", "vae.ckpt_every=0", "unet.ckpt_every=0"]
    first = run_training(load_config(DEBUG, [*base, f"out={tmp_path / 'a'}"]), progress=False)
    cfg = load_config(DEBUG, [*base, f"out={tmp_path / 'b'}", f"init_from={first}"])
    second = run_training(cfg, progress=False)
    a, b = checkpoint.load(first), checkpoint.load(second)
    for (name, p), q in zip(a.vae.state_dict().items(), b.vae.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert a.vae.scaling == b.vae.scaling
    changed = [
        not torch.equal(p, q)
        for p, q in zip(a.denoiser.parameters(), b.denoiser.parameters(), strict=True)
    ]
    assert any(changed)
    wrong = load_config(
        DEBUG, [*base, f"out={tmp_path / 'c'}", f"init_from={first}", "unet.model.channels=[8,16]"]
    )
    with pytest.raises(ValueError, match="architecture differs"):
        run_training(wrong, progress=False)


def test_t_min_draws_training_timesteps_from_the_sampled_range():
    cfg = load_config(DEBUG, ["unet.t_min=90", "schedule.prediction=x0", "unet.patch_size=0"])
    spy = Spy()
    _diffusion_loss(spy, cfg, n=16)
    t = spy.seen[0][1]
    assert t.min() >= 90 and t.max() < cfg.schedule.num_train_timesteps
