"""Timestep plans and sampler steps as pure functions of explicit arrays.

The loop :func:`sample` takes the denoiser as a callable, so one loop runs in the tests
(torch), in offline evaluation (onnxruntime) and in the Triton ``sampler`` model (a BLS
request to ``unet`` per step). Per-request state (plan, noise keys) is passed in, never
stored. The noise is a function of (seed, row, global latent position) (``cxr_sr.noise``), so
the tiles of one image draw the same noise where they overlap.

    denoise(x_t: float32[N, C, h, w], t: float32[N], z_lr: float32[N, C, h, w])
        -> float32[N, C, h, w]   (eps, v or x0, as ``schedule.prediction`` says)

The arrays may be numpy arrays, torch tensors (CPU or CUDA) or CuPy arrays: the loop uses
only operators and methods they share (``cxr_sr.arrays``), keeps its state in the type and
on the device of ``z_lr``, and the denoiser gets and returns that type. The noise is drawn
in numpy (bit-exact on every device) and moved to the device once per draw. The per-element
update runs in float64 (the schedule tables are float64), its result is stored as float32.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from cxr_sr.arrays import Array, astype, from_numpy, full, namespace, to_numpy
from cxr_sr.imaging import SCALE
from cxr_sr.noise import SEED_LIMIT, NoiseKey, RowNoise, draw_noise
from cxr_sr.schedule import Schedule

SAMPLERS = ("ddim", "ddpm", "dpmpp")
STARTS = ("noise", "lr")
SPACINGS = ("trailing", "leading")

Denoiser = Callable[[Array, Array, Array], Array]


MAX_STEPS = 1000  # the server also caps steps at the plan's span (T * strength)
ORIGIN_LIMIT = 2**20  # LR pixels: the largest tile position a request may name

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


@dataclass(frozen=True)
class Param:
    """One request parameter: the single definition every interface is derived from.

    ``kinds`` of value: ``int``, ``float``, ``str`` (one of ``choices``, case-insensitive)
    or ``bool``. ``low``/``high`` bound numbers (inclusive; ``low_open`` makes the lower
    bound exclusive). ``default`` None means "the checkpoint's value" (``sampling.json``
    next to the served sampler); ``help`` is shown by the CLIs and the docs. ``flag``
    False: a key that programs set (the tile position), not offered as a command-line flag.
    """

    name: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    default: Any = None
    flag: bool = True

    def expects(self) -> str:
        """What a valid value looks like, e.g. ``a number in (0, 1]``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        text = _TYPE_NAMES[self.kind]
        low, high = (
            None if b is None else str(int(b)) if self.kind is int else f"{b:g}"
            for b in (self.low, self.high)
        )
        if low is not None and high is not None:
            text += f" in {'(' if self.low_open else '['}{low}, {high}]"
        elif low is not None:
            text += f" {'>' if self.low_open else '>='} {low}"
        return text

    def _fail(self, value: Any) -> ValueError:
        return ValueError(f"'{self.name}' must be {self.expects()}, got {value!r}")

    def validate(self, value: Any) -> Any:
        """``value`` if it has this parameter's Python type and range, else ValueError.

        Strict: no strings for numbers, and a bool is never a number (``True`` is not 1).
        """
        if self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise self._fail(value)
            return bool(value)
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise self._fail(value)
            return value
        if isinstance(value, (bool, np.bool_)):
            raise self._fail(value)
        wanted = numbers.Integral if self.kind is int else numbers.Real
        if not isinstance(value, wanted) or not math.isfinite(value):
            raise self._fail(value)
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        if not low_ok or (self.high is not None and value > self.high):
            raise self._fail(value)
        return value

    def parse(self, value: Any) -> Any:
        """A wire value (JSON scalar, or a string as perf_analyzer sends) -> the typed value.

        Strings are parsed strictly: ``"false"`` is False (never ``bool("false")``), ``"4"``
        is 4, ``"4.5"`` is no integer; choices are matched after strip() and lower().
        """
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str):
            text = value.strip()
            if self.kind is str:
                value = text.lower()
            elif self.kind is bool:
                lowered = text.lower()
                if lowered not in ("true", "false"):
                    raise self._fail(value)
                value = lowered == "true"
            else:
                try:
                    value = self.kind(text)
                except ValueError:
                    raise self._fail(value) from None
        elif self.kind is float and isinstance(value, numbers.Integral):
            value = value if isinstance(value, bool) else float(value)
        value = self.validate(value)
        return int(value) if self.kind is int else value


# The request schema: SamplingOptions' fields (defaults from the checkpoint), then the seed.
OPTION_PARAMS = (
    Param("steps", int, "number of denoiser calls", low=1, high=MAX_STEPS),
    Param(
        "sampler",
        str,
        "ddim (Song et al. 2021, eq. 12), ddpm (Ho et al. 2020, ancestral, strided) or dpmpp "
        "(DPM-Solver++(2M), Lu et al. 2022, second order, deterministic)",
        choices=SAMPLERS,
    ),
    Param("eta", float, "DDIM stochasticity, 0 = deterministic given the start", low=0, high=1),
    Param(
        "start",
        str,
        "noise: pure noise at t = T-1; lr: the LR latent noised to strength * T (SDEdit)",
        choices=STARTS,
    ),
    Param(
        "strength",
        float,
        "fraction of the schedule the plan covers",
        low=0,
        high=1,
        low_open=True,
    ),
    Param(
        "spacing",
        str,
        "timestep spacing: trailing (includes t = T-1) or leading (diffusers' DDIM default)",
        choices=SPACINGS,
    ),
    Param(
        "early_stop",
        float,
        "stop an image early once its x0 estimate changes by less than this fraction "
        "(relative RMS) between two steps; 0 = always run every step",
        low=0,
        high=1,
    ),
)
SEED = Param(
    "seed",
    int,
    "noise seed; the same seed and input give the same output",
    low=0,
    high=SEED_LIMIT - 1,
    default=0,
)
# Where the request's LR sits in a larger image (a tile), in LR pixels from its top-left
# corner: the sampling noise is a function of the global position (cxr_sr.noise), so
# overlapping tiles draw the same noise where they overlap. Set by tiling clients.
ORIGIN_PARAMS = tuple(
    Param(
        f"origin_{axis}",
        int,
        f"{name} of the LR's top-left pixel in the whole image it is a tile of (LR pixels); "
        "the noise is keyed by global position, so overlapping tiles agree",
        low=0,
        high=ORIGIN_LIMIT,
        default=0,
        flag=False,
    )
    for axis, name in (("y", "row"), ("x", "column"))
)
REQUEST_PARAMS = (*OPTION_PARAMS, SEED, *ORIGIN_PARAMS)
PARAMS_BY_NAME = {p.name: p for p in REQUEST_PARAMS}


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling controls; each field is validated by its :data:`OPTION_PARAMS`
    entry (the request schema), where its meaning is spelled out.

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
        early_stop: per image (batch row), stop once the x0 estimate changes by less than
            this between two consecutive denoiser calls, as the relative RMS
            ``||x0_i - x0_{i-1}|| / ||x0_i||``; the row's result is then ``x0_i``. Per row,
            not per batch, so a result never depends on what it was batched with. 0 = off.
    """

    steps: int = 4
    sampler: str = "ddim"
    eta: float = 0.0
    start: str = "lr"
    strength: float = 1.0
    spacing: str = "trailing"
    early_stop: float = 0.0

    def __post_init__(self) -> None:
        for param in OPTION_PARAMS:
            param.validate(getattr(self, param.name))

    def replace(self, **changes) -> SamplingOptions:
        return SamplingOptions(**{**self.__dict__, **changes})


if tuple(p.name for p in OPTION_PARAMS) != tuple(f.name for f in fields(SamplingOptions)):
    raise RuntimeError("OPTION_PARAMS must list SamplingOptions' fields, in order")


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
    """DDIM update (Song et al. 2021, eq. 12 with sigma from eq. 16).

    ``x_t, x0, eps``: arrays of one shape (any library, see the module docstring);
    ``abar_t, abar_prev``: scalars; ``noise``: an array like ``x_t``, or None when eta = 0.
    """
    abar_t, abar_prev = float(abar_t), float(abar_prev)
    var = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    std = eta * math.sqrt(var)
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - std**2, 0.0)) * eps
    if eta > 0 and noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


def ddpm_step(x_t, x0, abar_t, abar_prev, noise):
    """Ancestral DDPM update on a strided plan (Ho et al. 2020, eq. 6-7; fixed_small variance).

    Arrays and scalars as :func:`ddim_step`; ``noise`` None gives the posterior mean.
    """
    abar_t, abar_prev = float(abar_t), float(abar_prev)
    alpha = abar_t / abar_prev
    beta = 1.0 - alpha
    mean = (math.sqrt(abar_prev) * beta / (1.0 - abar_t)) * x0 + (
        math.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t)
    ) * x_t
    if noise is None:
        return mean
    var = max((1.0 - abar_prev) / (1.0 - abar_t) * beta, 1e-20)
    return mean + math.sqrt(var) * noise


def _half_log_snr(abar: float) -> float:
    """lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022, sec. 2), alpha_t^2 = abar_t."""
    return 0.5 * math.log(abar / (1.0 - abar))


def dpmpp_2m_step(x_s, x0, abar_s, abar_t, x0_before=None, abar_before=None):
    """DPM-Solver++(2M) from timestep s to the next, smaller, timestep t (Lu et al. 2022,
    "DPM-Solver++", Algorithm 2, data prediction).

    With ``h = lambda_t - lambda_s`` and ``D`` the x0 estimate extrapolated along lambda:

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D                       (eq. 9-10)
        D   = x0                                     (first step: DPM-Solver++(1), = DDIM)
        D   = (1 + 1/(2r)) x0 - 1/(2r) x0_before,   r = (lambda_s - lambda_before) / h

    ``x0`` is the estimate at s, ``x0_before`` the one at the step before (timestep with
    ``abar_before``). Arrays and scalars as :func:`ddim_step`; deterministic (no noise).
    """
    abar_s, abar_t = float(abar_s), float(abar_t)
    lam_s = _half_log_snr(abar_s)
    h = _half_log_snr(abar_t) - lam_s
    alpha_t, ratio = math.sqrt(abar_t), math.sqrt((1.0 - abar_t) / (1.0 - abar_s))
    if x0_before is None:
        d = x0
    else:
        r = (lam_s - _half_log_snr(float(abar_before))) / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_before
    return ratio * x_s - (alpha_t * math.expm1(-h)) * d


def latent_origin(origin: tuple[int, int], vae_factor: int) -> tuple[int, int]:
    """A tile's origin in LR pixels -> its latent origin (the latent has ``SCALE / f`` pixels
    per LR pixel for a VAE of factor f); ValueError when it falls between latent pixels."""
    out = []
    for axis, value in zip("yx", origin, strict=True):
        if (value * SCALE) % vae_factor:
            step = vae_factor // math.gcd(vae_factor, SCALE)
            raise ValueError(
                f"'origin_{axis}' must be a multiple of {step} for this model (VAE factor "
                f"{vae_factor}), got {value}"
            )
        out.append(value * SCALE // vae_factor)
    return out[0], out[1]


def _relative_change(x0: Array, x0_before: Array) -> np.ndarray:
    """Per row, ``||x0 - x0_before|| / ||x0||`` (RMS over the row), on the host: float64[N]."""
    n = x0.shape[0]
    diff = x0 - x0_before
    num = to_numpy((diff * diff).reshape(n, -1).sum(1))
    den = to_numpy((x0 * x0).reshape(n, -1).sum(1))
    return np.sqrt(num / np.maximum(den, 1e-30))


def sample(
    denoise: Denoiser,
    z_lr: Array,
    schedule: Schedule,
    options: SamplingOptions,
    keys: Sequence[NoiseKey],
) -> Array:
    """Run the reverse process; returns the predicted HR latent, float32, in the array type
    and on the device of ``z_lr``.

    Args:
        denoise: the network, see the module docstring; it gets and returns arrays of
            ``z_lr``'s type, for the rows still being sampled (all of them unless
            ``options.early_stop`` stops some early).
        z_lr: conditioning latent of the LR image, float32[N, C, h, w]: a numpy array, a
            torch tensor (CPU or CUDA) or a CuPy array.
        schedule: the training schedule (read from the checkpoint).
        options: the plan for this batch (all rows share it).
        keys: one noise key per row (``cxr_sr.noise.noise_keys``); draw 0 is the start
            noise, draw i the noise added after the i-th denoiser call.
    """
    if len(z_lr.shape) != 4:
        raise ValueError(f"z_lr must be [N, C, h, w], got shape {tuple(z_lr.shape)}")
    if len(keys) != z_lr.shape[0]:
        raise ValueError(f"need one noise key per row: {len(keys)} for {z_lr.shape[0]} rows")
    abar = schedule.alphas_cumprod()
    ts = timesteps(
        schedule.num_train_timesteps,
        options.steps,
        spacing=options.spacing,
        strength=options.strength,
    )
    n = z_lr.shape[0]
    shape = tuple(int(s) for s in z_lr.shape[1:])
    rows = [RowNoise(k) for k in keys]  # this call's noise cursors

    def noise(draw: int) -> Array:
        return from_numpy(draw_noise(rows, draw, shape), z_lr)

    x = noise(0)
    if options.start == "lr":  # q(x_t0 | x_0 = z_lr)
        x = astype(schedule.q_sample(z_lr, x, abar[ts[0]]), "float32")
    cond = z_lr
    active = list(range(n))  # the rows of z_lr still being sampled (early stop drops rows)
    done = {}  # row -> its final x0 [1, C, h, w], float64
    x0 = x0_before = None
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        out = denoise(x, full(len(active), t, x), cond)
        x0_before = x0
        x0, eps = schedule.split(astype(x, "float64"), a_t, astype(out, "float64"))
        if i + 1 == len(ts):
            break
        if options.early_stop > 0 and x0_before is not None:
            change = _relative_change(x0, x0_before)
            keep = [j for j in range(len(active)) if not change[j] < options.early_stop]
            if len(keep) < len(active):
                for j in set(range(len(active))) - set(keep):
                    done[active[j]] = x0[j : j + 1]
                if not keep:
                    break
                active = [active[j] for j in keep]
                rows = [rows[j] for j in keep]
                x, x0, eps, cond = x[keep], x0[keep], eps[keep], cond[keep]
                x0_before = x0_before[keep]
        if options.sampler == "ddim":
            step_noise = noise(i + 1) if options.eta > 0 else None
            x = ddim_step(x, x0, eps, a_t, a_prev, options.eta, step_noise)
        elif options.sampler == "ddpm":
            x = ddpm_step(x, x0, a_t, a_prev, noise(i + 1))
        else:
            x = dpmpp_2m_step(x, x0, a_t, a_prev, x0_before, abar[ts[i - 1]] if i > 0 else None)
        x = astype(x, "float32")
    if not done:
        return astype(x0, "float32")
    result = namespace(z_lr).zeros_like(astype(z_lr, "float32"))
    for j, row in enumerate(active if len(done) < n else []):
        done[row] = x0[j : j + 1]
    for row, value in done.items():
        result[row : row + 1] = astype(value, "float32")
    return result
