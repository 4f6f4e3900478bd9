"""Losses: SSIM against the numpy metric, Parseval for the frequency loss, one target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import metrics
from cxrdiff import Schedule
from train.losses import frequency_loss, kl_standard_normal, ssim, target_coefficients


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
    np.testing.assert_allclose(c_x0.numpy() * x0 + c_eps.numpy() * eps,
                               s.target(x0, eps, abar), atol=1e-12)
