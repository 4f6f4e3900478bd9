"""Golden values of the schedules and agreement with diffusers' tables."""

import numpy as np
import pytest

from cxr_sr import Schedule


def test_linear_golden_values():
    # DDPM (Ho et al. 2020): T = 1000, beta 1e-4 .. 0.02
    abar = Schedule("linear", 1000, 1e-4, 0.02).alphas_cumprod()
    assert abar[0] == pytest.approx(1 - 1e-4, abs=1e-15)
    assert abar[499] == pytest.approx(0.07858724, rel=1e-6)
    assert abar[-1] == pytest.approx(4.035830e-05, rel=1e-5)


def test_cosine_golden_values():
    # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = Schedule("cosine", 1000).alphas_cumprod()
    assert abar[0] == pytest.approx(f(1) / f(0), rel=1e-12)
    assert abar[499] == pytest.approx(f(500) / f(0), rel=1e-9)
    assert abar[-1] < 1e-8  # beta clipped at 0.999 at the very end


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("T", [300, 1000])
def test_tables_match_diffusers(kind, T):
    from diffusers import DDPMScheduler

    sched = Schedule(kind, T, 1e-4, 0.02)
    ref = DDPMScheduler.from_config(sched.to_diffusers_config())
    np.testing.assert_allclose(sched.betas(), ref.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    # diffusers builds its tables in float32
    np.testing.assert_allclose(
        sched.alphas_cumprod(), ref.alphas_cumprod.double().numpy(), rtol=5e-5, atol=1e-7
    )


def test_snr_shift_scales_snr():
    base, shifted = Schedule("cosine", 300), Schedule("cosine", 300, snr_shift=0.5)
    snr = lambda a: a / (1 - a)
    np.testing.assert_allclose(
        snr(shifted.alphas_cumprod()), 0.25 * snr(base.alphas_cumprod()), rtol=1e-9
    )


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_split_inverts_target(prediction):
    sched = Schedule(prediction=prediction)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 2, 4, 8, 8))  # two [N=2, C=4, 8, 8] arrays
    abar = sched.alphas_cumprod()[[10, 150]].reshape(2, 1, 1, 1)
    x_t = sched.q_sample(x0, eps, abar)
    x0_hat, eps_hat = sched.split(x_t, abar, sched.target(x0, eps, abar))
    np.testing.assert_allclose(x0_hat, x0, atol=1e-9)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-9)


def test_q_sample_is_the_forward_process():
    sched = Schedule("cosine", 300)
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 3, 4, 8, 8))
    abar = sched.alphas_cumprod()[[0, 100, 299]].reshape(3, 1, 1, 1)
    np.testing.assert_array_equal(
        sched.q_sample(x0, eps, abar), np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    )
    # a scalar abar (the samplers' SDEdit start) broadcasts
    np.testing.assert_array_equal(
        sched.q_sample(x0, eps, abar[1, 0, 0, 0]),
        sched.q_sample(x0, eps, np.full_like(abar, abar[1])),
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_q_sample_numpy_and_torch_agree(dtype):
    torch = pytest.importorskip("torch")
    sched = Schedule("linear", 300, prediction="v")
    rng = np.random.default_rng(2)
    x0, eps = rng.standard_normal((2, 3, 4, 8, 8)).astype(dtype)
    abar = sched.alphas_cumprod()[[5, 150, 299]].reshape(3, 1, 1, 1).astype(dtype)
    ref = sched.q_sample(x0, eps, abar)
    out = sched.q_sample(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(abar))
    assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, dtype)
    tol = 1e-12 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(out.numpy(), ref, rtol=tol, atol=tol)
    # the target takes torch tensors the same way
    target = sched.target(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(abar))
    np.testing.assert_allclose(target.numpy(), sched.target(x0, eps, abar), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_q_sample_matches_diffusers_add_noise(kind):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    sched = Schedule(kind, 1000, 1e-4, 0.02)
    ref = DDPMScheduler.from_config(sched.to_diffusers_config())
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    want = ref.add_noise(x0, eps, t)
    abar = torch.from_numpy(sched.alphas_cumprod())[t].float().view(-1, 1, 1, 1)
    got = sched.q_sample(x0, eps, abar)
    # diffusers builds its tables in float32; ours are float64 rounded to float32 here
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    sched = Schedule("cosine", 300, prediction="v", snr_shift=0.7)
    sched.save(tmp_path)
    assert Schedule.load(tmp_path) == sched


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "quadratic"},
        {"prediction": "epsilon"},
        {"num_train_timesteps": 1},
        {"beta_start": 0.1, "beta_end": 0.01},
        {"snr_shift": 0},
    ],
)
def test_bad_values_raise(kwargs):
    with pytest.raises(ValueError):
        Schedule(**kwargs)
