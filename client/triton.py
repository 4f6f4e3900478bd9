"""A thin tritonclient wrapper for the ``cxr_sr`` ensemble (HTTP or gRPC).

Served contract: input ``LR`` FP32 ``[N, 1, H, W]`` in [0, 1] with H and W within the
server's limits (:meth:`SRClient.limits`, read from the served config), output ``SR`` FP32
``[N, 1, 4H, 4W]``; sampling controls travel as Triton request parameters and only the
ones given are sent (the server's config holds the defaults). The keyword arguments are the
request schema's keys (``cxr_sr.sampling.REQUEST_PARAMS``), nothing more.

    with SRClient("127.0.0.1:8000") as c:
        c.wait_ready(30)
        sr = c.super_resolve(lr, steps=4, seed=0)   # lr [N, 1, H, W] within the limits
        big = c.upscale(image, steps=4)             # any [H, W] -> [4H, 4W], tiled if needed

``upscale`` cuts an image larger than the server's maximum side into overlapping tiles
(``client.tiling``), sends each tile as its own request with its position in the image
(``origin_y``, ``origin_x``: the server keys the noise by global position, so overlapping
tiles agree), ``in_flight`` requests at a time (the server's dynamic batcher merges
concurrent ones), and blends the results with feathered weights.
"""

from __future__ import annotations

import http.client
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_sr.client.tiling import TilePlan, pad_to, plan_tiles, run_tiled
from cxr_sr.imaging import SCALE, check_image
from cxr_sr.sampling import ORIGIN_PARAMS, REQUEST_PARAMS
from cxr_sr.serving import request_parameters

PROTOCOLS = ("http", "grpc")
INPUT_NAME = "LR"
OUTPUT_NAME = "SR"
DEFAULT_MODEL = "cxr_sr"
DEFAULT_MAX_BATCH = 8  # the ensemble's max_batch_size
# Tile requests in flight by default. The cpu target computes one batch at a time, so more
# only queue; and with the first-version demo weights (VAE attention, quadratic in pixels) at
# LR 128, 2 in flight grew a VAE model process to 9 GB and the OOM killer ended it on a
# 24 GB machine (measured), while 1 peaked at 2.6 GB. Raise it for a GPU server.
DEFAULT_IN_FLIGHT = 1
_UNREACHABLE_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
_TRANSIENT_STATUS = frozenset({"502", "503", "504", "StatusCode.UNAVAILABLE"})


class SRServerError(RuntimeError):
    """The server answered with an error (or returned something off contract).

    ``status`` is the server's status code when it sent one (e.g. ``"400"`` or
    ``"StatusCode.INVALID_ARGUMENT"``).
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """True for errors a retry may cure: no connection, or the server (or a proxy in
        front of it) said it is unavailable or overloaded (HTTP 502/503/504, gRPC
        UNAVAILABLE). Never for a refused request (400) or a model's own error."""
        return isinstance(self, SRConnectionError) or self.status in _TRANSIENT_STATUS


class SRConnectionError(SRServerError):
    """No server answered at the given address (refused, unreachable or timed out)."""


@dataclass(frozen=True)
class SizeLimits:
    """The LR sides (H and W) the served model accepts, inclusive, and what one request may
    hold: ``max_request_pixels`` LR pixels in all (None: no limit), each image's sides counted
    padded up to ``multiple`` (the networks' multiple, as the server counts them)."""

    min_side: int
    max_side: int
    max_request_pixels: int | None = None
    multiple: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"need 1 <= min_side <= max_side, got {self}")

    def rows_per_request(self, height: int, width: int, max_batch: int) -> int:
        """How many ``height`` x ``width`` images one request may carry (at least 1)."""
        if not self.max_request_pixels:
            return max_batch
        m = max(1, self.multiple)
        padded = (-(-height // m) * m) * (-(-width // m) * m)
        return max(1, min(max_batch, self.max_request_pixels // padded))

    def describe(self) -> str:
        if self.min_side == self.max_side:
            return f"{self.min_side}x{self.min_side}"
        return f"H and W in [{self.min_side}, {self.max_side}]"


# The served contract's defaults, used when a dynamic-size config names no limits.
DEFAULT_LIMITS = SizeLimits(16, 256)
# the ensemble's config parameters that publish them (written by builders.triton_config)
LIMIT_PARAMETERS = {"min_side": "lr_min_side", "max_side": "lr_max_side"}
REQUEST_PARAMETERS = {"max_request_pixels": "max_request_pixels", "multiple": "lr_multiple"}


def limits_from_config(config: dict) -> SizeLimits:
    """The LR size limits in a served model configuration (Triton's JSON form).

    ``LR`` dims ``[1, H, W]`` with fixed H = W: exactly that size; ``-1`` (dynamic):
    the config's ``lr_min_side`` / ``lr_max_side`` parameters, else :data:`DEFAULT_LIMITS`.
    """
    inputs = {i.get("name"): i for i in config.get("input", [])}
    if INPUT_NAME not in inputs:
        raise SRServerError(f"the served model has no input {INPUT_NAME!r}")
    dims = [int(d) for d in inputs[INPUT_NAME].get("dims", [])]
    if len(dims) == 4 and int(config.get("max_batch_size", 0)) == 0:
        dims = dims[1:]  # no batching axis in the config: the batch is part of the dims
    if len(dims) != 3:
        raise SRServerError(f"input {INPUT_NAME!r} has dims {dims}, expected [1, H, W]")
    h, w = dims[1:]
    if h > 0 and w > 0:
        if h != w:
            raise SRServerError(f"input {INPUT_NAME!r} is fixed at {h}x{w}: not square")
        return SizeLimits(h, h)
    params = config.get("parameters") or {}
    values = {}
    for key, name in {**LIMIT_PARAMETERS, **REQUEST_PARAMETERS}.items():
        raw = (params.get(name) or {}).get("string_value")
        values[key] = int(raw) if raw not in (None, "") else getattr(DEFAULT_LIMITS, key)
    return SizeLimits(**values)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a result: the served checkpoint's ``name``, its ``version`` (the one
    the checkpoint records, else the cxr-sr package version it was built with) and
    ``weights_sha256``, the SHA-256 over its weight and config files (``builders.build``).

    The builder publishes it as parameters of the ``cxr_sr`` ensemble
    (:data:`IDENTITY_PARAMETERS`); :meth:`SRClient.model_identity` reads it back. It goes into
    every report row and every derived DICOM instance, whose UIDs it also keys.
    """

    name: str
    version: str
    weights_sha256: str

    def short(self) -> str:
        """``name version (sha256 first 12 hex)``, for logs and series descriptions."""
        return f"{self.name} {self.version} ({self.weights_sha256[:12]})"

    def parameters(self) -> dict[str, str]:
        """The ensemble config parameters that publish this identity."""
        return {key: getattr(self, field) for field, key in IDENTITY_PARAMETERS.items()}

    @classmethod
    def from_config(cls, config: dict, model: str = DEFAULT_MODEL) -> ModelIdentity:
        """The identity a served config (Triton's JSON form) publishes; a repository built
        before identities were published gives ``version`` and ``weights_sha256`` "unknown"."""
        params = config.get("parameters") or {}
        values = {
            field: (params.get(key) or {}).get("string_value") or UNKNOWN
            for field, key in IDENTITY_PARAMETERS.items()
        }
        if values["name"] == UNKNOWN:
            values["name"] = str(config.get("name") or model)
        return cls(**values)


UNKNOWN = "unknown"
# ModelIdentity field -> ensemble config parameter (written by builders.triton_config)
IDENTITY_PARAMETERS = {
    "name": "model_name",
    "version": "model_version",
    "weights_sha256": "weights_sha256",
}


def _check_values(x: np.ndarray, name: str = "LR") -> None:
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} intensities must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")


def _check_lr(lr: np.ndarray) -> np.ndarray:
    """Shape [N, 1, H, W] (any H, W), floating point, finite, in [0, 1]."""
    x = np.asarray(lr)
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[0] < 1 or min(x.shape[2:]) < 1:
        raise ValueError(f"LR must have shape [N, 1, H, W], got {x.shape} (use lr[None, None])")
    _check_values(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_size(x: np.ndarray, limits: SizeLimits) -> None:
    h, w = x.shape[2:]
    if not (limits.min_side <= h <= limits.max_side and limits.min_side <= w <= limits.max_side):
        raise ValueError(
            f"LR shape {x.shape}: this server takes {limits.describe()}; "
            "SRClient.upscale tiles larger images and pads smaller ones"
        )


def _schema_keywords(fn):
    """Replace ``fn``'s ``**params`` by one keyword-only argument per schema key (for
    ``help()``, ``inspect`` and IDEs) and list the keys in its docstring."""
    sig = inspect.signature(fn)
    kept = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    keys = [
        inspect.Parameter(
            p.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=f"{p.kind.__name__} | None",
        )
        for p in REQUEST_PARAMS
    ]
    fn.__signature__ = sig.replace(parameters=kept + keys)
    lines = "\n".join(f"    {p.name}: {p.help}; {p.expects()}." for p in REQUEST_PARAMS)
    doc = inspect.cleandoc(fn.__doc__ or "")
    fn.__doc__ = f"{doc}\n\nSampling keywords (None: the server's default):\n{lines}\n"
    return fn


def _check_keywords(params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - {p.name for p in REQUEST_PARAMS})
    if unknown:
        known = ", ".join(p.name for p in REQUEST_PARAMS)
        raise TypeError(f"unknown sampling keyword(s) {', '.join(unknown)} (known: {known})")


@_schema_keywords
def sampling_parameters(**params: Any) -> dict[str, Any]:
    """Validated Triton request parameters for the given (non-None) sampling controls.

    Raises ``ValueError`` for a bad value and ``TypeError`` for a key the schema lacks.
    """
    _check_keywords(params)
    return request_parameters(params)


class SRClient:
    """Client for the super-resolution ensemble.

    Args:
        url: ``host:port`` without scheme (8000 is Triton's HTTP port, 8001 its gRPC port).
        protocol: ``"http"`` or ``"grpc"``.
        model: name of the ensemble.
        timeout_s: client-side limit for one request (connect and response), seconds.
        max_batch: largest batch sent in one request by ``super_resolve`` (bigger inputs
            are split).
        in_flight: tile requests ``upscale`` keeps in flight at once (see
            :data:`DEFAULT_IN_FLIGHT`).
        limits: the LR sizes the server takes; None (default): read from the served config
            on first use (:meth:`limits`).
        verbose: tritonclient's request logging.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8000",
        protocol: str = "http",
        model: str = DEFAULT_MODEL,
        timeout_s: float = 300.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        in_flight: int = DEFAULT_IN_FLIGHT,
        limits: SizeLimits | None = None,
        verbose: bool = False,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if "://" in url:
            raise ValueError(f"url must be host:port without a scheme, got {url!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
            raise ValueError(f"in_flight must be a positive integer, got {in_flight!r}")
        self.url = url
        self.protocol = protocol
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._limits = limits
        self._identity: ModelIdentity | None = None
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(
                url,
                verbose=verbose,
                concurrency=in_flight,  # tile requests in flight (async_infer)
                connection_timeout=self.timeout_s,
                network_timeout=self.timeout_s,
            )
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(url, verbose=verbose)
        self._tc = tc

    def __repr__(self) -> str:
        return f"SRClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

    def __enter__(self) -> SRClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection(s)."""
        self._client.close()

    def _error(self, e: BaseException, action: str) -> SRServerError:
        """Translate a tritonclient / socket exception into ``SRServerError``."""
        from tritonclient.utils import InferenceServerException

        where = f"{self.protocol}://{self.url}"
        if isinstance(e, InferenceServerException):
            status = None if e.status() is None else str(e.status())
            message = e.message() or str(e)
            if status in _UNREACHABLE_GRPC:
                return SRConnectionError(f"cannot reach Triton at {where}: {message}", status)
            return SRServerError(f"{action} failed on {where}: {message}", status)
        return SRConnectionError(f"cannot reach Triton at {where}: {e or type(e).__name__}")

    def _call(self, action: str, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except (InferenceServerException, OSError, http.client.HTTPException) as e:
            # HTTPException: the connection closed mid-response (geventhttpclient)
            raise self._error(e, action) from e

    def _grpc_timeout(self) -> dict[str, float]:
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _probe(self) -> str | None:
        """None when the server is live and the model ready, else the reason why not."""
        try:
            if not self._call("liveness check", self._client.is_server_live):
                return "server not live"
            if not self._call("readiness check", self._client.is_model_ready, self.model):
                return f"model {self.model!r} not ready"
        except SRServerError as e:
            return str(e)
        return None

    def is_ready(self) -> bool:
        """True when the server is live and the model is ready; False if not or unreachable."""
        return self._probe() is None

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        """Block until ``is_ready()``; ``SRConnectionError`` after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while True:
            reason = self._probe()
            if reason is None:
                return
            if time.monotonic() >= deadline:
                raise SRConnectionError(
                    f"Triton at {self.protocol}://{self.url} not ready after {timeout_s:g} s: "
                    f"{reason}"
                )
            time.sleep(interval_s)

    def model_config(self) -> dict:
        """The served model's configuration as a dict (Triton's JSON form)."""
        if self.protocol == "http":
            return self._call("get_model_config", self._client.get_model_config, self.model)
        return self._call(
            "get_model_config", self._client.get_model_config, self.model, as_json=True
        )["config"]

    def limits(self) -> SizeLimits:
        """The LR sizes the server accepts (from its config, asked once and remembered)."""
        if self._limits is None:
            self._limits = limits_from_config(self.model_config())
        return self._limits

    def model_identity(self) -> ModelIdentity:
        """The served model's name, version and weights hash (from its config, asked once)."""
        if self._identity is None:
            self._identity = ModelIdentity.from_config(self.model_config(), self.model)
        return self._identity

    @_schema_keywords
    def super_resolve(self, lr: np.ndarray, **params: Any) -> np.ndarray:
        """Super-resolve float ``[N, 1, H, W]`` in [0, 1] to float32 ``[N, 1, 4H, 4W]``;
        H and W must be within :meth:`limits` (:meth:`upscale` takes any size).

        Sampling controls left as None take the server's defaults. Batches larger than
        ``max_batch``, or than the server's ``max_request_pixels`` (:meth:`limits`), go out as
        several requests, each with the same parameters (so with a seed, the per-request noise
        follows the server's rule for a request of that size).
        Raises ``ValueError`` for bad input, ``TypeError`` for an unknown keyword,
        ``SRServerError`` / ``SRConnectionError`` for server-side failures.
        """
        x = _check_lr(lr)
        params = sampling_parameters(**params)
        limits = self.limits()
        _check_size(x, limits)
        rows = limits.rows_per_request(x.shape[2], x.shape[3], self.max_batch)
        chunks = [self._infer(x[i : i + rows], params) for i in range(0, x.shape[0], rows)]
        return np.concatenate(chunks, axis=0)

    def tile_plan(
        self, height: int, width: int, overlap: int | None = None, tile: int | None = None
    ) -> TilePlan:
        """How :meth:`upscale` cuts an ``height`` x ``width`` image for this server
        (``client.tiling.plan_tiles``): tiles of at most ``tile`` per side (default: the
        server's maximum side; within the server's sides); sides below the server's minimum
        are first mirrored out to it."""
        limits = self.limits()
        side = limits.max_side if tile is None else int(tile)
        if not limits.min_side <= side <= limits.max_side:
            raise ValueError(f"tile side {side} is outside the server's {limits.describe()}")
        h, w = max(height, limits.min_side), max(width, limits.min_side)
        return plan_tiles(h, w, side, overlap, min_side=limits.min_side)

    @_schema_keywords
    def upscale(
        self,
        image: np.ndarray,
        *,
        overlap: int | None = None,
        tile: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        **params: Any,
    ) -> np.ndarray:
        """Super-resolve one image of any size: float ``[H, W]`` in [0, 1] -> float32
        ``[4H, 4W]``.

        An image within :meth:`limits` is one request (the same result as
        ``super_resolve(image[None, None])``). A larger one is cut into overlapping tiles
        of at most ``tile`` per side (default: the largest the server takes; :meth:`tile_plan`;
        ``overlap`` in LR pixels, default a quarter of the tile; a smaller tile bounds the
        server's memory where a network's cost grows faster than its pixels, as an
        attention layer's does), each sent as its own request carrying its position
        (``origin_y``, ``origin_x``), ``in_flight`` at a time, and blended back with
        feathered weights (``client.tiling``). Sides below the server's minimum are mirrored
        out and the result cropped. ``progress(done, total)`` is called as tiles come back.
        The origin keys are set per tile and cannot be given.
        """
        x = check_image(image)
        _check_values(x, "image")
        fixed = [p.name for p in ORIGIN_PARAMS if params.get(p.name) is not None]
        if fixed:
            raise TypeError(f"upscale sets {', '.join(fixed)} per tile; do not pass them")
        params = sampling_parameters(**params)
        h, w = x.shape
        plan = self.tile_plan(h, w, overlap, tile)
        padded = pad_to(x, self.limits().min_side)
        done = [0]

        def advance(k: int) -> None:
            done[0] += k
            if progress is not None:
                progress(done[0], len(plan))

        if len(plan) == 1:
            sr = self._infer(padded[None, None], params)[0, 0]
            advance(1)
        else:

            def per_tile(tiles: np.ndarray, origins: Sequence[tuple[int, int]]) -> np.ndarray:
                keyed = [
                    {**params, **{p.name: int(v) for p, v in zip(ORIGIN_PARAMS, o, strict=True)}}
                    for o in origins
                ]
                return np.concatenate(self._infer_many(list(tiles[:, None]), keyed))

            sr = run_tiled(per_tile, padded, plan, batch=self.in_flight, progress=advance)
        return sr[: SCALE * h, : SCALE * w]

    def _request(self, x: np.ndarray):
        tc = self._tc
        inp = tc.InferInput(INPUT_NAME, list(x.shape), "FP32")
        if self.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=True)
            out = tc.InferRequestedOutput(OUTPUT_NAME, binary_data=True)
        else:
            inp.set_data_from_numpy(x)
            out = tc.InferRequestedOutput(OUTPUT_NAME)
        return [inp], [out]

    def _output(self, result, x: np.ndarray) -> np.ndarray:
        sr = result.as_numpy(OUTPUT_NAME)
        want = (x.shape[0], 1, SCALE * x.shape[2], SCALE * x.shape[3])
        if sr is None or sr.shape != want:
            got = None if sr is None else sr.shape
            raise SRServerError(f"server returned {OUTPUT_NAME} of shape {got}, expected {want}")
        return sr.astype(np.float32, copy=False)

    def _infer(self, x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        inputs, outputs = self._request(x)
        result = self._call(
            "inference",
            self._client.infer,
            self.model,
            inputs,
            outputs=outputs,
            parameters=params or None,
            **self._grpc_timeout(),
        )
        return self._output(result, x)

    def _infer_many(
        self, xs: Sequence[np.ndarray], params: Sequence[dict[str, Any]]
    ) -> list[np.ndarray]:
        """One request per array, all in flight at once (the server batches them);
        results in order. Callers keep ``len(xs) <= in_flight``."""
        if self.protocol == "http":
            handles = []
            for x, p in zip(xs, params, strict=True):
                inputs, outputs = self._request(x)
                handles.append(
                    self._call(
                        "inference",
                        self._client.async_infer,
                        self.model,
                        inputs,
                        outputs=outputs,
                        parameters=p or None,
                    )
                )
            return [
                self._output(self._call("inference", h.get_result), x)
                for h, x in zip(handles, xs, strict=True)
            ]
        results: list[Any] = [None] * len(xs)
        errors: list[BaseException | None] = [None] * len(xs)
        left = [len(xs)]
        done = threading.Event()
        lock = threading.Lock()

        def finished(i: int, result, error) -> None:
            results[i], errors[i] = result, error
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        for i, (x, p) in enumerate(zip(xs, params, strict=True)):
            inputs, outputs = self._request(x)
            self._call(
                "inference",
                self._client.async_infer,
                self.model,
                inputs,
                lambda result, error, i=i: finished(i, result, error),
                outputs=outputs,
                parameters=p or None,
                client_timeout=self.timeout_s,
            )
        if not done.wait(self.timeout_s + 5.0):
            raise SRConnectionError(f"no answer from {self.protocol}://{self.url} in time")
        for error in errors:
            if error is not None:
                raise self._error(error, "inference") from error
        return [self._output(r, x) for r, x in zip(results, xs, strict=True)]
