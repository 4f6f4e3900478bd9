"""The numpy sampler against diffusers' schedulers driving the same torch network, and the
position-keyed noise (``cxr_sr.noise``): a window of the field is the field's window."""

import numpy as np
import pytest
import torch

from cxr_sr import SamplingOptions, Schedule, noise, sample, timesteps
from cxr_sr.noise import MAX_THREADS, NoiseKey, RowNoise, draw_noise, noise_keys, noise_threads
from cxr_sr.sampling import latent_origin
from cxr_sr.train.models import Denoiser, UNetConfig, build_unet

C, S = 4, 16


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    return Denoiser(build_unet(UNetConfig(channels=[16, 32], norm_groups=8), C, S)).eval()


def as_numpy_callable(net):
    @torch.no_grad()
    def denoise(x_t, t, z_lr):
        return net(torch.from_numpy(x_t), torch.from_numpy(t), torch.from_numpy(z_lr)).numpy()

    return denoise


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("T,steps", [(300, 10), (1000, 8), (300, 3)])
def test_timesteps_match_diffusers(spacing, T, steps):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(timesteps(T, steps, spacing=spacing), ref.timesteps.numpy())


def test_strength_truncates_plan():
    ts = timesteps(300, 4, strength=0.5)
    assert ts[0] == 149 and len(ts) == 4 and np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError):
        timesteps(300, 301)


def diffusers_loop(scheduler, net, x_T, z_lr, steps, generator=None):
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(x_T)
    cond = torch.from_numpy(z_lr)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(x, t.float().expand(x.shape[0]), cond)
            kw = {"generator": generator} if generator is not None else {}
            x = scheduler.step(out, t, x, **kw).prev_sample
    return x.numpy()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_loop_matches_diffusers(denoiser, prediction, kind):
    from diffusers import DDIMScheduler

    sched = Schedule(kind, 300, prediction=prediction)
    opts = SamplingOptions(steps=10, sampler="ddim", start="noise")
    z_lr = np.random.default_rng(1).standard_normal((2, C, S, S)).astype(np.float32)
    keys = noise_keys([7], [2])
    ours = sample(as_numpy_callable(denoiser), z_lr, sched, opts, keys)

    x_T = draw_noise([RowNoise(k) for k in keys], 0, (C, S, S))
    cfg = sched.to_diffusers_config()
    cfg.update(timestep_spacing="trailing", set_alpha_to_one=True)
    ref = diffusers_loop(DDIMScheduler.from_config(cfg), denoiser, x_T, z_lr, 10)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_ddpm_loop_matches_diffusers(denoiser, prediction):
    """Same network, same start and the same per-step noise: the ancestral chains agree."""
    from diffusers import DDPMScheduler

    sched = Schedule("linear", 300, prediction=prediction)
    steps = 6
    z_lr = np.random.default_rng(2).standard_normal((1, C, S, S)).astype(np.float32)
    x_T = np.random.default_rng(3).standard_normal((1, C, S, S)).astype(np.float32)
    ref = diffusers_loop(
        DDPMScheduler.from_config(sched.to_diffusers_config()),
        denoiser,
        x_T,
        z_lr,
        steps,
        generator=torch.Generator().manual_seed(11),
    )

    # Replay diffusers' noise draws (torch.randn on its generator) through our steps.
    from cxr_sr.sampling import ddpm_step

    g = torch.Generator().manual_seed(11)
    abar = sched.alphas_cumprod()
    ts = timesteps(300, steps)
    x, f = x_T, as_numpy_callable(denoiser)
    for i, t in enumerate(ts):
        out = f(x, np.full((1,), t, np.float32), z_lr)
        x0, _ = sched.split(x.astype(np.float64), abar[t], out.astype(np.float64))
        noise = torch.randn(x.shape, generator=g).numpy()
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x = ddpm_step(x, x0, abar[t], a_prev, noise).astype(np.float32)
    np.testing.assert_allclose(x, ref, atol=2e-4, rtol=1e-4)


def numpy_free_torch_ddim(net, sched, z_lr, x_T, steps):
    """An independent torch DDIM (eta = 0) loop written from the paper's eq. 12."""
    abar = torch.tensor(sched.alphas_cumprod())
    ts = (
        torch.round(torch.arange(sched.num_train_timesteps, 0, -sched.num_train_timesteps / steps))
        - 1
    )
    x, cond = torch.from_numpy(x_T).double(), torch.from_numpy(z_lr)
    with torch.no_grad():
        for i, t in enumerate(ts.long()):
            a = abar[t]
            a_prev = abar[ts[i + 1].long()] if i + 1 < len(ts) else torch.tensor(1.0).double()
            x0 = net(x.float(), t.float().expand(x.shape[0]), cond).double()  # x0 prediction
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.float().numpy()


def test_ddim_matches_independent_torch_loop(denoiser):
    sched = Schedule("linear", 300, prediction="x0")
    z_lr = np.random.default_rng(4).standard_normal((3, C, S, S)).astype(np.float32)
    ours = sample(
        as_numpy_callable(denoiser),
        z_lr,
        sched,
        SamplingOptions(steps=5, start="noise"),
        noise_keys([5], [3]),
    )
    x_T = draw_noise([RowNoise(k) for k in noise_keys([5], [3])], 0, (C, S, S))
    np.testing.assert_allclose(
        ours, numpy_free_torch_ddim(denoiser, sched, z_lr, x_T, 5), atol=1e-4
    )


def test_seed_determinism_and_batch_independence(denoiser):
    sched = Schedule()
    f = as_numpy_callable(denoiser)
    z = np.random.default_rng(0).standard_normal((3, C, S, S)).astype(np.float32)
    opts = SamplingOptions(steps=3, sampler="ddpm")
    a = sample(f, z, sched, opts, noise_keys([42, 9], [2, 1]))
    b = sample(f, z, sched, opts, noise_keys([42, 9], [2, 1]))
    np.testing.assert_array_equal(a, b)
    # the third row alone, with its own seed, gives the same values as inside the batch
    alone = sample(f, z[2:], sched, opts, noise_keys([9], [1]))
    np.testing.assert_allclose(alone, a[2:], atol=1e-5)
    c = sample(f, z, sched, opts, noise_keys([43, 9], [2, 1]))
    assert not np.allclose(a[:2], c[:2])


def test_lr_start_at_low_strength_stays_near_lr(denoiser):
    """SDEdit start: with a tiny strength the chain starts close to z_lr."""
    sched = Schedule(prediction="x0")
    z = np.random.default_rng(0).standard_normal((1, C, S, S)).astype(np.float32)
    identity = lambda x_t, t, z_lr: z_lr  # a denoiser that predicts x0 = z_lr
    out = sample(
        identity,
        z,
        sched,
        SamplingOptions(steps=2, start="lr", strength=0.05),
        noise_keys([0], [1]),
    )
    np.testing.assert_allclose(out, z, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": 2.5},
        {"sampler": "euler"},
        {"eta": 2.0},
        {"strength": 0.0},
        {"start": "x"},
    ],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingOptions(**kwargs)


@pytest.mark.parametrize("key", [(-1, 0, 0, 0), (2**63, 0, 0, 0), (0, 0, -1, 0), (1.5, 0, 0, 0)])
def test_bad_noise_keys_raise(key):
    with pytest.raises(ValueError):
        NoiseKey(*key)
    with pytest.raises(ValueError):
        NoiseKey(0, block=0)
    if key[0] == -1:
        with pytest.raises(ValueError):
            noise_keys([-1], [1])


# --- position-keyed noise ------------------------------------------------------------------

B = 16  # a small block side, so that small windows cross many blocks


@pytest.mark.parametrize("draw", [0, 3])
@pytest.mark.parametrize(
    "origin,size",
    [((0, 0), (16, 16)), ((37, 20), (40, 33)), ((B - 1, B), (2, 44)), ((64, 5), (36, 1))],
)
def test_noise_of_a_window_is_the_window_of_the_noise(origin, size, draw):
    whole = NoiseKey(5, row=1, block=B).window(draw, (3, 100, 76))
    (y, x), (h, w) = origin, size
    tile = NoiseKey(5, 1, y, x, block=B).window(draw, (3, h, w))
    np.testing.assert_array_equal(tile, whole[:, y : y + h, x : x + w])


def test_tiles_cover_the_whole_field_and_overlaps_agree():
    """Overlapping tiles of one image, laid back at their origins, rebuild the whole field."""
    whole = NoiseKey(11).window(0, (4, 150, 130))
    rebuilt = np.full_like(whole, np.nan)
    for y in range(0, 150, 40):
        for x in range(0, 130, 40):
            h, w = min(56, 150 - y), min(56, 130 - x)
            tile = NoiseKey(11, 0, y, x).window(0, (4, h, w))
            seen = rebuilt[:, y : y + h, x : x + w]
            overlap = ~np.isnan(seen)
            np.testing.assert_array_equal(tile[overlap], seen[overlap])
            rebuilt[:, y : y + h, x : x + w] = tile
    np.testing.assert_array_equal(rebuilt, whole)


def test_a_64x64_request_keeps_the_noise_it_had_before_positions():
    """Block (0, 0) is the row stream every row drew before: PCG64([seed, row]), the k-th
    standard_normal call being draw k. So 64x64 outputs (f = 4: latent 64) are unchanged."""
    for seed, row in ((0, 0), (7, 2), (2**40 + 3, 1)):
        legacy = np.random.Generator(np.random.PCG64([seed, row]))
        stream = [legacy.standard_normal((4, 64, 64), dtype=np.float32) for _ in range(4)]
        rows = RowNoise(NoiseKey(seed, row))
        for k in range(4):  # in order, as the loop draws
            np.testing.assert_array_equal(rows.window(k, (4, 64, 64)), stream[k])
        np.testing.assert_array_equal(rows.window(1, (4, 64, 64)), stream[1])  # replayed
        np.testing.assert_array_equal(NoiseKey(seed, row).window(2, (4, 64, 64)), stream[2])


def test_noise_streams_are_distinct_and_standard_normal():
    base = NoiseKey(3, 0, 64, 64).window(0, (4, 64, 64))
    assert abs(base.mean()) < 0.03 and abs(base.std() - 1) < 0.02
    for other in (
        NoiseKey(4, 0, 64, 64),
        NoiseKey(3, 1, 64, 64),
        NoiseKey(3),
        NoiseKey(3, 0, 0, 64),
    ):
        assert abs(np.corrcoef(base.ravel(), other.window(0, base.shape).ravel())[0, 1]) < 0.03
    later = NoiseKey(3, 0, 64, 64).window(1, base.shape)
    assert abs(np.corrcoef(base.ravel(), later.ravel())[0, 1]) < 0.03
    # fixed-width keys: seed 2**32 is not seed 0 row 1 (a plain SeedSequence list would be)
    assert not np.array_equal(
        NoiseKey(2**32, 0, 64, 0).window(0, (1, 4, 4)), NoiseKey(0, 1, 64, 0).window(0, (1, 4, 4))
    )
    # neighbouring blocks are independent, not shifted copies
    row = NoiseKey(3, block=B).window(0, (1, 1, 3 * B))[0, 0]
    assert not np.allclose(row[B : 2 * B], row[2 * B :])


def test_noise_is_pinned():
    """Golden values: the same seed gives the same noise on every machine and version."""
    got = NoiseKey(0, 0, 64, 0).window(0, (1, 1, 3))[0, 0]
    np.testing.assert_allclose(got, GOLDEN_NOISE, rtol=0, atol=1e-6)


GOLDEN_NOISE = np.array([0.31768098, -1.1183742, 0.17353241], dtype=np.float32)


def test_a_tile_samples_the_window_of_the_whole_image():
    """With a per-pixel denoiser the loop is local, so a tile's latent (origin given) equals
    that window of the whole image's, for every sampler that draws noise."""
    sched = Schedule(prediction="x0")
    pointwise = lambda x_t, t, z_lr: 0.5 * x_t + 0.3 * z_lr + 1e-4 * t[:, None, None, None]
    z = np.random.default_rng(0).standard_normal((1, C, 40, 36)).astype(np.float32)
    for opts in (
        SamplingOptions(steps=3, sampler="ddpm", start="noise"),
        SamplingOptions(steps=3, sampler="ddim", eta=0.7, start="lr", strength=0.6),
    ):
        whole = sample(pointwise, z, sched, opts, noise_keys([8], [1]))
        tile = z[:, :, 9:29, 17:36]
        got = sample(pointwise, tile, sched, opts, noise_keys([8], [1], [(9, 17)]))
        np.testing.assert_array_equal(got, whole[:, :, 9:29, 17:36])


def test_latent_origin_follows_the_vae_factor():
    assert latent_origin((37, 20), 4) == (37, 20)
    assert latent_origin((10, 4), 8) == (5, 2)
    assert latent_origin((3, 1), 2) == (6, 2)
    with pytest.raises(ValueError, match="'origin_x' must be a multiple of 2"):
        latent_origin((2, 3), 8)


# --- DPM-Solver++(2M) ------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize(
    "kind,steps,strength", [("linear", 8, 1.0), ("cosine", 5, 1.0), ("linear", 4, 0.6)]
)
def test_dpmpp_loop_matches_diffusers(denoiser, prediction, kind, steps, strength):
    """Our DPM-Solver++(2M) and diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2,
    midpoint, final step to sigma 0) driving the same network from the same start agree;
    lower_order_final off: ours is the paper's Algorithm 2 on every step."""
    from diffusers import DPMSolverMultistepScheduler

    sched = Schedule(kind, 300, prediction=prediction, snr_shift=0.7 if kind == "cosine" else 1)
    opts = SamplingOptions(steps=steps, sampler="dpmpp", start="noise", strength=strength)
    z_lr = np.random.default_rng(5).standard_normal((2, C, S, S)).astype(np.float32)
    keys = noise_keys([3], [2])
    ours = sample(as_numpy_callable(denoiser), z_lr, sched, opts, keys)

    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=300,
        trained_betas=sched.betas(),
        prediction_type=sched.to_diffusers_config()["prediction_type"],
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=False,
        final_sigmas_type="zero",
    )
    ts = timesteps(300, steps, strength=strength)
    ref.set_timesteps(timesteps=ts.tolist())
    np.testing.assert_array_equal(ref.timesteps.numpy(), ts)
    x = torch.from_numpy(draw_noise([RowNoise(k) for k in keys], 0, (C, S, S)))
    with torch.no_grad():
        for t in ref.timesteps:
            out = denoiser(x, t.float().expand(2), torch.from_numpy(z_lr))
            x = ref.step(out, t, x).prev_sample
    np.testing.assert_allclose(ours, x.numpy(), atol=2e-4, rtol=1e-4)


def test_dpmpp_first_step_is_ddim():
    """DPM-Solver++(1) is DDIM (eta 0): with two steps both samplers make one identical update."""
    sched = Schedule(prediction="eps")
    f = lambda x_t, t, z_lr: 0.3 * x_t - 0.2 * z_lr  # noqa: E731
    z = np.random.default_rng(1).standard_normal((2, C, 8, 8)).astype(np.float32)
    keys = noise_keys([1], [2])
    a = sample(f, z, sched, SamplingOptions(steps=2, sampler="dpmpp"), keys)
    b = sample(f, z, sched, SamplingOptions(steps=2, sampler="ddim"), keys)
    np.testing.assert_allclose(a, b, atol=1e-6)
    c = sample(f, z, sched, SamplingOptions(steps=3, sampler="dpmpp"), keys)
    d = sample(f, z, sched, SamplingOptions(steps=3, sampler="ddim"), keys)
    assert not np.allclose(c, d, atol=1e-4)  # the second-order correction acts from step 2


# --- one loop for numpy and torch arrays -----------------------------------------------------


def as_torch_callable(net, calls=None):
    @torch.no_grad()
    def denoise(x_t, t, z_lr):
        assert isinstance(x_t, torch.Tensor) and isinstance(t, torch.Tensor)
        assert x_t.dtype == t.dtype == torch.float32 and isinstance(z_lr, torch.Tensor)
        if calls is not None:
            calls.append(len(x_t))
        return net(x_t, t, z_lr)

    return denoise


@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(steps=4, sampler="ddim"),
        SamplingOptions(steps=4, sampler="ddim", eta=0.6, start="noise"),
        SamplingOptions(steps=4, sampler="ddpm", strength=0.7),
        SamplingOptions(steps=5, sampler="dpmpp", start="noise", spacing="leading"),
        SamplingOptions(
            steps=6, sampler="dpmpp", early_stop=0.045
        ),  # row 2 stops at call 3, 0-1 at 4
    ],
    ids=["ddim", "ddim-eta", "ddpm", "dpmpp", "dpmpp-early-stop"],
)
def test_the_same_loop_runs_on_numpy_and_torch_tensors(denoiser, opts):
    """sample() on torch-CPU tensors (the type a GPU loop holds) gives numpy's result, and
    returns a float32 tensor: the core is array-generic without importing torch."""
    sched = Schedule(prediction="eps")
    z = np.random.default_rng(6).standard_normal((3, C, S, S)).astype(np.float32)
    keys = noise_keys([4, 8], [2, 1], [(0, 0), (16, 0)])
    ours = sample(as_numpy_callable(denoiser), z, sched, opts, keys)
    calls = []
    got = sample(as_torch_callable(denoiser, calls), torch.from_numpy(z), sched, opts, keys)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert calls == ([3] * opts.steps if not opts.early_stop else [3, 3, 3, 2])
    np.testing.assert_allclose(got.numpy(), ours, atol=1e-5, rtol=1e-5)


def test_unknown_array_types_are_refused():
    from cxr_sr.arrays import namespace

    with pytest.raises(TypeError, match="numpy array, torch tensor or CuPy array"):
        namespace([1.0, 2.0])
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        sample(lambda *a: a[0], np.zeros((C, S, S), np.float32), Schedule(), SamplingOptions(), [])


# --- adaptive early stop ---------------------------------------------------------------------


def test_early_stop_is_per_row_and_saves_denoiser_calls(denoiser):
    sched = Schedule(prediction="x0")
    z = np.random.default_rng(7).standard_normal((3, C, S, S)).astype(np.float32)
    keys = noise_keys([2], [3])
    full_run = SamplingOptions(steps=8, sampler="ddim", start="noise")
    calls = []
    f = as_numpy_callable(denoiser)

    def counted(x_t, t, z_lr):
        calls.append(len(x_t))
        return f(x_t, t, z_lr)

    plain = sample(counted, z, sched, full_run, keys)
    assert calls == [3] * 8
    np.testing.assert_array_equal(
        sample(f, z, sched, full_run.replace(early_stop=0.0), keys), plain
    )

    calls.clear()
    stopped = sample(counted, z, sched, full_run.replace(early_stop=0.5), keys)
    assert sum(calls) < 24 and calls[0] == 3 and calls == sorted(calls, reverse=True)
    # each row's result is what that row gives sampled alone: per row, not per batch
    for r in range(3):
        alone = sample(f, z[r : r + 1], sched, full_run.replace(early_stop=0.5), keys[r : r + 1])
        np.testing.assert_allclose(alone, stopped[r : r + 1], atol=1e-5)
    # a row that stopped after k calls holds the x0 estimate of its k-th call
    first_two = sample(f, z, sched, full_run.replace(early_stop=1.0), keys)
    never = sample(f, z, sched, full_run.replace(early_stop=1e-9), keys)
    np.testing.assert_array_equal(never, plain)
    assert not np.allclose(first_two, plain, atol=1e-3)


def test_early_stop_threshold_sets_the_stop_step():
    """With an estimate whose relative change falls below the threshold at a known step, the
    row stops exactly there and returns that step's x0."""
    sched = Schedule(prediction="x0")
    z = np.ones((2, 1, 4, 4), np.float32)
    z[1] *= 3
    keys = noise_keys([0], [2])
    seen = []

    def denoise(x_t, t, z_lr):
        seen.append(len(x_t))
        k = len(seen)  # x0 after call k: z * (1 + 2**-(k-1))
        return z_lr * (1 + 2.0 ** -(k - 1))

    out = sample(denoise, z, sched, SamplingOptions(steps=10, early_stop=0.1), keys)
    # change from call k-1 to k: 2**-(k-1) / (1 + 2**-(k-1)) = .33, .2, .11, .059: < 0.1 at k = 5
    assert seen == [2, 2, 2, 2, 2]
    np.testing.assert_allclose(out, z * (1 + 2.0**-4), rtol=1e-6)


def _batch_rows():
    """Rows of a batch as the sampler sees them: whole images and tiles at several origins,
    windows crossing blocks, two requests with different seeds."""
    keys = noise_keys([5, 9], [3, 2], [(0, 0), (B - 3, 2 * B + 1)], block=B)
    return [RowNoise(k) for k in keys]


@pytest.fixture
def small_batches_in_threads(monkeypatch):
    """Batches this small are drawn in the calling thread unless the threshold is lowered."""
    monkeypatch.setattr(noise, "PARALLEL_MIN_VALUES", 0)


@pytest.mark.parametrize("threads", [2, 3])
def test_noise_drawn_in_threads_equals_the_serial_draw(threads, small_batches_in_threads):
    """Every block of every row is a task of its own; the batch is the same bit for bit, draw
    after draw (block (0, 0) keeps a stream per row, advanced once per draw)."""
    shape = (4, 2 * B + 5, B + 7)
    serial, threaded = _batch_rows(), _batch_rows()
    for draw in range(3):
        want = draw_noise(serial, draw, shape, threads=1)
        got = draw_noise(threaded, draw, shape, threads=threads)
        assert noise._pool is not None and noise._pool[0] == threads  # drawn by the pool
        np.testing.assert_array_equal(got, want)
        for i, row in enumerate(serial):
            np.testing.assert_array_equal(want[i], NoiseKey(**vars(row.key)).window(draw, shape))


def test_noise_threads_setting(monkeypatch, small_batches_in_threads):
    rows = _batch_rows()
    want = draw_noise(_batch_rows(), 0, (4, 40, 40), threads=1)
    monkeypatch.setenv("CXR_NOISE_THREADS", "3")
    assert noise_threads() == 3
    np.testing.assert_array_equal(draw_noise(rows, 0, (4, 40, 40)), want)
    monkeypatch.setenv("CXR_NOISE_THREADS", "1")
    assert noise_threads() == 1
    for bad in ("0", "two"):
        monkeypatch.setenv("CXR_NOISE_THREADS", bad)
        with pytest.raises(ValueError, match="CXR_NOISE_THREADS"):
            draw_noise(rows, 0, (4, 40, 40))
    with pytest.raises(ValueError, match="threads must be at least 1"):
        draw_noise(rows, 0, (4, 40, 40), threads=0)
    monkeypatch.delenv("CXR_NOISE_THREADS")
    assert 1 <= noise_threads() <= MAX_THREADS


def test_a_row_listed_twice_is_still_right(small_batches_in_threads):
    """Its block (0, 0) has one stream: the batch is drawn in one thread, not raced."""
    row = RowNoise(NoiseKey(4, block=B))
    got = draw_noise([row, row], 1, (4, B, B), threads=2)
    want = NoiseKey(4, block=B).window(1, (4, B, B))
    np.testing.assert_array_equal(got, np.stack([want, want]))


def test_a_forked_child_draws_with_its_own_threads(small_batches_in_threads):
    """The pool does not survive a fork (its threads stay in the parent): a child made after
    the parent drew in threads (a DataLoader worker, a forked server) draws in fresh ones."""
    import multiprocessing

    shape = (4, 2 * B, 2 * B)
    want = draw_noise(_batch_rows(), 0, shape, threads=2)  # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_draw_in_child, (shape,)).get(timeout=60)
    np.testing.assert_array_equal(got, want)


def _draw_in_child(shape):
    return draw_noise(_batch_rows(), 0, shape, threads=2)
