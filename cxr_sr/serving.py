"""Request handling shared by the Triton Python models, testable without Triton.

Everything here is derived from the one request schema, :data:`cxr_sr.sampling.REQUEST_PARAMS`
(key, type, allowed values, default, help): the server's parser (:func:`parse_parameters`),
the client's parameter dict (:func:`request_parameters`) and the command-line flags
(:func:`add_arguments`, :func:`namespace_parameters`). A key the schema does not know is an
error on both sides, never silently dropped.

Triton hands a Python model the request parameters as a JSON string; an ensemble forwards
the client's parameters to every step (the other steps ignore them). Triton consumes its own
reserved parameters (``sequence_id``, ``priority``, ``timeout``, ...) before the model sees
them and refuses keys starting with ``triton_``. A server started with
``--http-header-forward-pattern`` / ``--grpc-header-forward-pattern`` also passes the matching
headers as parameters: name those in the sampler's config parameter ``ignored_parameters``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any, NamedTuple

import numpy as np

from cxr_sr.sampling import (
    MAX_STEPS,
    ORIGIN_PARAMS,
    PARAMS_BY_NAME,
    REQUEST_PARAMS,
    SEED,
    Param,
    SamplingOptions,
)

# consumed by Triton itself (never reach a model); ignored should a caller pass them anyway
TRITON_RESERVED = (
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "binary_data_output",
)
REQUEST_KEYS = tuple(p.name for p in REQUEST_PARAMS)
FLAG_PARAMS = tuple(p for p in REQUEST_PARAMS if p.flag)  # the command-line flags


def _unknown(keys: Iterable[str]) -> str | None:
    """The error for keys the schema does not know, or None when there are none."""
    unknown = sorted(k for k in keys if k not in PARAMS_BY_NAME)
    if not unknown:
        return None
    names = ", ".join(f"'{k}'" for k in unknown)
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown request parameter{plural} {names} (known: {', '.join(REQUEST_KEYS)})"


def _load(raw: str | Mapping | None) -> dict:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"request parameters are not valid JSON: {err}") from None
    if not isinstance(raw, Mapping):
        raise ValueError("request parameters must be a JSON object")
    return dict(raw)


class RequestSettings(NamedTuple):
    """What one request asks of the sampler: the plan, the seed and the tile origin
    ``(origin_y, origin_x)`` in LR pixels."""

    options: SamplingOptions
    seed: int
    origin: tuple[int, int] = (0, 0)


def parse_parameters(
    raw: str | Mapping | None,
    defaults: SamplingOptions,
    num_train_timesteps: int,
    ignore: Collection[str] = (),
    max_steps: int | None = None,
) -> RequestSettings:
    """Request parameters -> (SamplingOptions, seed, origin); ValueError naming the offending
    key.

    Every key of the schema is honoured; absent ones take ``defaults`` (the checkpoint's),
    seed 0 and origin (0, 0). Any other key is rejected, except Triton's reserved ones and
    ``ignore``. ``max_steps``: the server's limit on steps per request (its config parameter
    of that name), on top of the model's own.
    """
    params = {
        k: v
        for k, v in _load(raw).items()
        if k not in TRITON_RESERVED and k not in ignore and not k.startswith("triton_")
    }
    problem = _unknown(params)
    if problem:
        raise ValueError(problem)
    values = {k: PARAMS_BY_NAME[k].parse(v) for k, v in params.items()}
    seed = values.pop(SEED.name, SEED.default)
    origin = tuple(values.pop(p.name, p.default) for p in ORIGIN_PARAMS)
    options = defaults.replace(**values)
    limit = min(MAX_STEPS, int(round(num_train_timesteps * options.strength)))
    if max_steps is not None and options.steps > max_steps and max_steps < limit:
        raise ValueError(
            f"'steps' must be <= {max_steps} on this server (max_steps), got {options.steps}"
        )
    if options.steps > limit:
        raise ValueError(
            f"'steps' must be <= {limit} for this model ({num_train_timesteps} timesteps) "
            f"at strength {options.strength:g}, got {options.steps}"
        )
    return RequestSettings(options, seed, origin)


def request_parameters(given: Mapping[str, Any]) -> dict[str, Any]:
    """Client side: the Triton request parameters for the given (non-None) schema keys.

    Values are parsed and checked as the server will (so a bad one fails before sending) and
    sent typed (int, float, str, bool); an unknown key is a ValueError naming it.
    """
    problem = _unknown(given)
    if problem:
        raise ValueError(problem)
    return {k: PARAMS_BY_NAME[k].parse(v) for k, v in given.items() if v is not None}


def _argparse_type(param: Param):
    def convert(text: str):
        try:
            return param.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = param.name
    return convert


def add_arguments(
    parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None
) -> argparse._ArgumentGroup:
    """One ``--<key>`` flag per schema key (help from the schema), in an argument group;
    keys that programs set (``Param.flag`` False: the tile origin) get none.

    ``defaults`` gives flag defaults; keys without one default to None (not sent: the
    server's default applies, the checkpoint's or seed 0).
    """
    defaults = dict(defaults or {})
    problem = _unknown(defaults)
    if problem:
        raise ValueError(problem)
    group = parser.add_argument_group(
        "sampling (Triton request parameters)",
        "each flag given is sent as the request parameter of the same name",
    )
    for p in FLAG_PARAMS:
        default = defaults.get(p.name)
        if default is not None:
            default = p.parse(default)
            note = f"default: {default}"
        elif p.default is not None:
            note = f"server default: {p.default}"
        else:
            note = "server default: the checkpoint's"
        group.add_argument(
            f"--{p.name.replace('_', '-')}",
            dest=p.name,
            type=_argparse_type(p),
            default=default,
            metavar="{" + ",".join(p.choices) + "}" if p.choices else p.kind.__name__.upper(),
            help=f"{p.help}; {p.expects()} ({note})",
        )
    return group


def namespace_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The request parameters set in ``args`` (as parsed with :func:`add_arguments`)."""
    return request_parameters({p.name: getattr(args, p.name, None) for p in FLAG_PARAMS})


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


def check_image_shape(
    name: str, shape: Sequence[int], min_side: int, max_side: int, channels: int = 1
) -> str | None:
    """None if ``shape`` is [N, channels, H, W] with H and W in [min_side, max_side], else
    the reason, naming what was sent and what is accepted."""
    shape = tuple(int(s) for s in shape)
    want = f"[N, {channels}, H, W] with H and W in [{min_side}, {max_side}]"
    if len(shape) != 4 or shape[0] < 1 or shape[1] != channels:
        return f"input '{name}' must be {want}; got shape {list(shape)}"
    h, w = shape[2:]
    if not (min_side <= h <= max_side and min_side <= w <= max_side):
        return (
            f"input '{name}' is {h}x{w} (H x W): each side must be in [{min_side}, {max_side}] "
            f"on this server (larger images are tiled by the client); got shape {list(shape)}"
        )
    return None


def parse_flag(text: str) -> bool:
    """A model-config boolean: "true"/"false" (also 1/0, yes/no, on/off), case-insensitive;
    ValueError otherwise (``bool("false")`` is True, so never that)."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def check_request_pixels(name: str, shape: Sequence[int], max_pixels: int | None) -> str | None:
    """None if ``shape`` [N, C, H, W] holds at most ``max_pixels`` pixels (N x H x W; None: no
    limit), else the reason, naming the limit."""
    if not max_pixels or len(shape) != 4:
        return None
    n, _, h, w = (int(s) for s in shape)
    if n * h * w <= max_pixels:
        return None
    return (
        f"input '{name}' holds {n} x {h} x {w} = {n * h * w:,} pixels; this server takes at "
        f"most {max_pixels:,} per request (max_request_pixels): send fewer or smaller images"
    )


def chunk_rows(
    pixels_per_row: int, max_pixels: int | None, max_rows: int | None = None
) -> int | None:
    """How many rows one call takes: at most ``max_pixels`` pixels (but at least one row) and
    at most ``max_rows`` rows (None: no limit of that kind; None when there is neither)."""
    per = max(1, max_pixels // max(1, pixels_per_row)) if max_pixels else None
    if max_rows:
        per = min(per or max_rows, max_rows)
    return per


def row_chunks(
    rows: int, pixels_per_row: int, max_pixels: int | None, max_rows: int | None = None
) -> list[slice]:
    """Split ``rows`` items into consecutive slices of at most ``max_pixels`` pixels (at
    least one row each) and at most ``max_rows`` rows (None: no such limit; neither: one
    slice). A dynamic batch of large images then runs in several network calls, so memory
    stays bounded; rows are independent of their batch, so results do not change."""
    per = chunk_rows(pixels_per_row, max_pixels, max_rows) or max(rows, 1)
    return [slice(i, min(rows, i + per)) for i in range(0, rows, per)]


def batch_bucket(rows: int, cap: int) -> int:
    """The batch size ``rows`` rows run at when batches are bucketed: the next power of two,
    at most ``cap`` (never fewer than ``rows``). A dynamic batcher forms every size from 1 to
    its maximum; bucketed, a network sees a handful of shapes, so CUDA graphs and cuDNN's
    autotuning are paid a few times, not once per size."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return max(rows, min(bucket, cap))


def options_key(options: SamplingOptions) -> tuple:
    """Hashable key: requests with equal keys share one sampling loop."""
    return tuple(getattr(options, f.name) for f in fields(options))


class InputChecks(NamedTuple):
    """The per-request checks of a network model, from its config parameters (written by
    ``builders.triton_config``): ``input_sides`` (JSON ``{"LR": [16, 256]}``) and
    ``input_ranges`` (JSON ``{"LR": [0, 1]}``). Shared by the onnxruntime and torch models."""

    sides: dict
    ranges: dict

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> InputChecks:
        return cls(
            json.loads(params.get("input_sides", "{}")),
            json.loads(params.get("input_ranges", "{}")),
        )

    def problem(self, feeds: Mapping[str, Any], to_numpy=np.asarray) -> str | None:
        """None, or why a request's inputs are refused (sides first: they are cheap).
        ``to_numpy`` turns an input into a numpy array for the value check."""
        for name, (low, high) in self.sides.items():
            problem = check_image_shape(name, tuple(feeds[name].shape), low, high)
            if problem:
                return problem
        for name, limits in self.ranges.items():
            problem = check_finite_range(name, to_numpy(feeds[name]), *limits)
            if problem:
                return problem
        return None


def model_parameters(args: Mapping[str, str]) -> tuple[dict, dict[str, str]]:
    """A Triton Python model's ``initialize`` args -> (its config, its string parameters)."""
    config = json.loads(args["model_config"])
    return config, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
