"""Timestep plans and sampler steps as pure functions of explicit arrays.

The loop :func:`sample` takes the denoiser as a callable, so one loop runs in the tests
(torch), in offline evaluation (onnxruntime) and in the Triton ``sampler`` model (a BLS
request to ``unet`` per step). Per-request state (plan, noise keys) is passed in, never
stored. The noise is a function of (seed, row, global latent position) (``cxr_sr.noise``), so
the tiles of one image draw the same noise where they overlap.

    denoise(x_t: float32[N, C, h, w], t: float32[N], z_lr: float32[N, C, h, w])
        -> float32[N, C, h, w]   (eps, v or x0, as ``schedule.prediction`` says)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from cxr_sr.imaging import SCALE
from cxr_sr.noise import SEED_LIMIT, NoiseKey, RowNoise, draw_noise
from cxr_sr.schedule import Schedule

SAMPLERS = ("ddim", "ddpm")
STARTS = ("noise", "lr")
SPACINGS = ("trailing", "leading")

Denoiser = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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
        "ddim (Song et al. 2021, eq. 12) or ddpm (Ho et al. 2020, ancestral, strided)",
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
    """

    steps: int = 4
    sampler: str = "ddim"
    eta: float = 0.0
    start: str = "lr"
    strength: float = 1.0
    spacing: str = "trailing"

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


def sample(
    denoise: Denoiser,
    z_lr: np.ndarray,
    schedule: Schedule,
    options: SamplingOptions,
    keys: Sequence[NoiseKey],
) -> np.ndarray:
    """Run the reverse process; returns the predicted HR latent, float32 like ``z_lr``.

    Args:
        denoise: the network, see the module docstring.
        z_lr: conditioning latent of the LR image, float32[N, C, h, w].
        schedule: the training schedule (read from the checkpoint).
        options: the plan for this batch (all rows share it).
        keys: one noise key per row (``cxr_sr.noise.noise_keys``); draw 0 is the start
            noise, draw i the noise added after the i-th denoiser call.
    """
    if z_lr.ndim != 4:
        raise ValueError(f"z_lr must be [N, C, h, w], got shape {z_lr.shape}")
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
    shape = z_lr.shape[1:]
    rows = [RowNoise(k) for k in keys]  # this call's noise cursors
    x = draw_noise(rows, 0, shape)
    if options.start == "lr":  # q(x_t0 | x_0 = z_lr)
        a0 = abar[ts[0]]
        x = schedule.q_sample(z_lr, x, a0).astype(np.float32)
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
            noise = draw_noise(rows, i + 1, shape) if options.eta > 0 else None
            x = ddim_step(x, x0, eps, a_t, a_prev, options.eta, noise)
        else:
            x = ddpm_step(x, x0, a_t, a_prev, draw_noise(rows, i + 1, shape))
        x = x.astype(np.float32)
    return np.asarray(x0, dtype=np.float32)
