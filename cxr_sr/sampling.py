"""Timestep plans and sampler steps as pure functions of explicit arrays.

The loop :func:`sample` takes the denoiser as a callable, so one loop runs in the tests
(torch), in offline evaluation (onnxruntime) and in the Triton ``sampler`` model (a BLS
request to ``unet`` per step). Per-request state (seed, plan) is passed in, never stored.

    denoise(x_t: float32[N, C, h, w], t: float32[N], z_lr: float32[N, C, h, w])
        -> float32[N, C, h, w]   (eps, v or x0, as ``schedule.prediction`` says)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cxr_sr.schedule import Schedule

SAMPLERS = ("ddim", "ddpm")
STARTS = ("noise", "lr")
SPACINGS = ("trailing", "leading")

Denoiser = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling controls.

    Args:
        steps: number of denoiser calls.
        sampler: ``ddim`` (Song et al. 2021, eq. 12) or ``ddpm`` (Ho et al. 2020, eq. 6-7,
            ancestral, on the strided timesteps).
        eta: DDIM stochasticity (0 = deterministic given the start noise, 1 = DDPM-like).
        start: ``noise`` starts from pure noise at t = T-1; ``lr`` starts from the LR latent
            noised to ``strength * T`` (SDEdit, Meng et al. 2022), which needs fewer steps.
        strength: fraction of the schedule the plan covers, in (0, 1].
        spacing: ``trailing`` (always includes t = T-1; Lin et al. 2024, table 2) or
            ``leading`` (diffusers' default for DDIM).
    """

    steps: int = 4
    sampler: str = "ddim"
    eta: float = 0.0
    start: str = "lr"
    strength: float = 1.0
    spacing: str = "trailing"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")

    def replace(self, **changes) -> SamplingOptions:
        fields = {**self.__dict__, **changes}
        return SamplingOptions(**fields)


def timesteps(
    num_train_timesteps: int, steps: int, *, spacing: str = "trailing", strength: float = 1.0
) -> np.ndarray:
    """Descending int64 timesteps of a sampling plan, shape [steps].

    ``trailing`` matches diffusers' ``timestep_spacing="trailing"`` and ``leading`` its
    ``"leading"`` (with steps_offset 0) when ``strength`` is 1.
    """
    span = int(round(num_train_timesteps * strength))
    if steps > span:
        raise ValueError(f"steps ({steps}) exceeds the {span} timesteps the plan covers")
    if spacing == "trailing":
        ts = np.round(np.arange(span, 0, -span / steps)) - 1
    elif spacing == "leading":
        ratio = span // steps
        ts = (np.arange(steps) * ratio)[::-1] + (num_train_timesteps - span)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return ts.astype(np.int64)


def ddim_step(x_t, x0, eps, abar_t, abar_prev, eta, noise):
    """DDIM update (Song et al. 2021, eq. 12 with sigma from eq. 16)."""
    var = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    std = eta * np.sqrt(var)
    x_prev = np.sqrt(abar_prev) * x0 + np.sqrt(np.maximum(1.0 - abar_prev - std**2, 0.0)) * eps
    if eta > 0 and noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


def ddpm_step(x_t, x0, abar_t, abar_prev, noise):
    """Ancestral DDPM update on a strided plan (Ho et al. 2020, eq. 6-7; fixed_small variance)."""
    alpha = abar_t / abar_prev
    beta = 1.0 - alpha
    mean = (np.sqrt(abar_prev) * beta / (1.0 - abar_t)) * x0 + (
        np.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t)
    ) * x_t
    if noise is None:
        return mean
    var = np.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta, 1e-20)
    return mean + np.sqrt(var) * noise


def generators(seeds: Sequence[int], sizes: Sequence[int]) -> list[np.random.Generator]:
    """One PCG64 stream per row: row i of a request with seed s uses SeedSequence([s, i]).

    Rows are independent of how requests are batched together, so the same seed and input
    give the same output whatever else the server is doing.
    """
    rngs = []
    for seed, n in zip(seeds, sizes, strict=True):
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        rngs.extend(np.random.Generator(np.random.PCG64([int(seed), i])) for i in range(n))
    return rngs


def _noise(rngs: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    return np.stack([r.standard_normal(shape, dtype=np.float32) for r in rngs])


def sample(
    denoise: Denoiser,
    z_lr: np.ndarray,
    schedule: Schedule,
    options: SamplingOptions,
    rngs: list[np.random.Generator],
) -> np.ndarray:
    """Run the reverse process; returns the predicted HR latent, float32 like ``z_lr``.

    Args:
        denoise: the network, see the module docstring.
        z_lr: conditioning latent of the LR image, float32[N, C, h, w].
        schedule: the training schedule (read from the checkpoint).
        options: the plan for this batch (all rows share it).
        rngs: one generator per row (see :func:`generators`).
    """
    if z_lr.ndim != 4:
        raise ValueError(f"z_lr must be [N, C, h, w], got shape {z_lr.shape}")
    if len(rngs) != z_lr.shape[0]:
        raise ValueError(f"need one generator per row: {len(rngs)} for {z_lr.shape[0]} rows")
    abar = schedule.alphas_cumprod()
    ts = timesteps(
        schedule.num_train_timesteps,
        options.steps,
        spacing=options.spacing,
        strength=options.strength,
    )
    n = z_lr.shape[0]
    x = _noise(rngs, z_lr.shape[1:])
    if options.start == "lr":  # q(x_t0 | x_0 = z_lr)
        a0 = abar[ts[0]]
        x = (np.sqrt(a0) * z_lr + np.sqrt(1.0 - a0) * x).astype(np.float32)
    x0 = x
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        out = denoise(x, np.full((n,), t, dtype=np.float32), z_lr)
        x0, eps = schedule.split(x.astype(np.float64), a_t, out.astype(np.float64))
        last = i + 1 == len(ts)
        if last:
            break
        if options.sampler == "ddim":
            noise = _noise(rngs, z_lr.shape[1:]) if options.eta > 0 else None
            x = ddim_step(x, x0, eps, a_t, a_prev, options.eta, noise)
        else:
            x = ddpm_step(x, x0, a_t, a_prev, _noise(rngs, z_lr.shape[1:]))
        x = x.astype(np.float32)
    return np.asarray(x0, dtype=np.float32)
