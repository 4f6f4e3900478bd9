"""Request handling shared by the Triton Python models, testable without Triton.

Triton hands a Python model the request parameters as a JSON string; an ensemble forwards
the client's parameters to every step. These helpers turn them into typed options with
clear, specific errors (each becomes that request's INVALID_ARG response).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np

from cxr_sr.sampling import SamplingOptions

MAX_STEPS = 1000
DEFAULT_SEED = 0
# keys a client may send that this sampler reads; anything else is left to other models
SAMPLING_KEYS = ("steps", "seed", "sampler", "eta", "start", "strength")


def _as_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"parameter '{key}' must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"parameter '{key}' must be an integer, got {value!r}") from None
    return value


def _as_float(key: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"parameter '{key}' must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter '{key}' must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"parameter '{key}' must be finite, got {value!r}")
    return out


def parse_parameters(
    raw: str | dict | None, defaults: SamplingOptions, num_train_timesteps: int
) -> tuple[SamplingOptions, int]:
    """Request parameters -> (SamplingOptions, seed); raises ValueError on bad values."""
    if raw is None or raw == "":
        params = {}
    elif isinstance(raw, str):
        try:
            params = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"request parameters are not valid JSON: {err}") from None
    else:
        params = dict(raw)
    if not isinstance(params, dict):
        raise ValueError("request parameters must be a JSON object")
    changes: dict = {}
    if "steps" in params:
        changes["steps"] = _as_int("steps", params["steps"])
    for key in ("eta", "strength"):
        if key in params:
            changes[key] = _as_float(key, params[key])
    for key in ("sampler", "start"):
        if key in params:
            if not isinstance(params[key], str):
                raise ValueError(f"parameter '{key}' must be a string, got {params[key]!r}")
            changes[key] = params[key].strip().lower()
    seed = _as_int("seed", params["seed"]) if "seed" in params else DEFAULT_SEED
    if not 0 <= seed < 2**63:
        raise ValueError(f"parameter 'seed' must be in [0, 2**63), got {seed}")
    options = defaults.replace(**changes)  # SamplingOptions validates names and ranges
    limit = min(MAX_STEPS, int(round(num_train_timesteps * options.strength)))
    if options.steps > limit:
        raise ValueError(
            f"parameter 'steps' must be <= {limit} for this model and strength, got {options.steps}"
        )
    return options, seed


def check_finite_range(
    name: str, array: np.ndarray, low: float, high: float, tolerance: float = 1e-4
) -> str | None:
    """None if ``array`` is finite and inside [low, high] (+- tolerance), else the reason."""
    if not np.all(np.isfinite(array)):
        return f"input '{name}' contains NaN or infinity"
    lo, hi = float(array.min()), float(array.max())
    if lo < low - tolerance or hi > high + tolerance:
        return (
            f"input '{name}' must hold intensities in [{low:g}, {high:g}]; "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )
    return None


def options_key(options: SamplingOptions) -> tuple:
    """Hashable key: requests with equal keys share one sampling loop."""
    return tuple(getattr(options, f.name) for f in fields(options))
