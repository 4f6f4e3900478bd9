"""Losses: SSIM against the numpy metric, Parseval for the frequency loss, one target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_sr import Schedule
from cxr_sr.client import metrics
from cxr_sr.train.losses import frequency_loss, kl_standard_normal, ssim, target_coefficients


def test_ssim_matches_client_metric():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 48, 48, generator=g)
    y = (x + 0.1 * torch.randn(2, 1, 48, 48, generator=g)).clamp(0, 1)
    ours = ssim(x, y).numpy()
    ref = metrics.ssim(x.numpy(), y.numpy())
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    assert float(ssim(x, x).mean()) == pytest.approx(1.0, abs=1e-5)


def test_frequency_loss_parseval_and_weights():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 2, 16, 16, generator=g), torch.randn(3, 2, 16, 16, generator=g)
    mse = torch.mean((a - b) ** 2)
    assert float(frequency_loss(a, b, 1.0, 1.0)) == pytest.approx(float(mse), rel=1e-5)
    low = frequency_loss(a, b, 1.0, 0.0)
    high = frequency_loss(a, b, 0.0, 1.0)
    assert float(low + high) == pytest.approx(float(mse), rel=1e-5)


def test_kl_zero_at_standard_normal():
    assert float(kl_standard_normal(torch.zeros(4), torch.zeros(4))) == 0.0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_target_coefficients_follow_schedule(prediction):
    s = Schedule(prediction=prediction, num_train_timesteps=50)
    c_x0, c_eps = target_coefficients(s)
    abar = s.alphas_cumprod()
    x0, eps = np.random.default_rng(0).standard_normal((2, 50))
    np.testing.assert_allclose(
        c_x0.numpy() * x0 + c_eps.numpy() * eps, s.target(x0, eps, abar), atol=1e-12
    )


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_split_recovers_x0_from_torch_outputs(prediction):
    """Schedule.split on torch tensors (the training pixel term) inverts every target."""
    s = Schedule(prediction=prediction, num_train_timesteps=300)
    c_x0, c_eps = target_coefficients(s)
    abar = torch.from_numpy(s.alphas_cumprod())
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 7, 150, 299])
    x0, eps = torch.randn(2, 4, 3, 8, 8, generator=gen, dtype=torch.float64)
    view = lambda table: table[t].view(4, 1, 1, 1)  # noqa: E731
    x_t = view(abar).sqrt() * x0 + (1 - view(abar)).sqrt() * eps
    pred = view(c_x0) * x0 + view(c_eps) * eps  # a perfect denoiser
    got, _ = s.split(x_t, view(abar), pred)
    torch.testing.assert_close(got, x0, atol=1e-9, rtol=1e-9)
