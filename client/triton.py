"""A thin tritonclient wrapper for the ``cxr_sr`` ensemble (HTTP or gRPC).

Served contract: input ``LR`` FP32 ``[N, 1, 64, 64]`` in [0, 1], output ``SR`` FP32
``[N, 1, 256, 256]``; sampling controls travel as Triton request parameters and only the
ones given are sent (the server's config holds the defaults). The keyword arguments are the
request schema's keys (``cxr_sr.sampling.REQUEST_PARAMS``), nothing more.

    with SRClient("127.0.0.1:8000") as c:
        c.wait_ready(30)
        sr = c.super_resolve(lr, steps=4, seed=0)
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np

from cxr_sr.imaging import HR_SIZE, LR_SIZE
from cxr_sr.sampling import REQUEST_PARAMS
from cxr_sr.serving import request_parameters

PROTOCOLS = ("http", "grpc")
INPUT_NAME = "LR"
OUTPUT_NAME = "SR"
DEFAULT_MODEL = "cxr_sr"
DEFAULT_MAX_BATCH = 8  # the ensemble's max_batch_size
_UNREACHABLE_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


class SRServerError(RuntimeError):
    """The server answered with an error (or returned something off contract).

    ``status`` is the server's status code when it sent one (e.g. ``"400"`` or
    ``"StatusCode.INVALID_ARGUMENT"``).
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class SRConnectionError(SRServerError):
    """No server answered at the given address (refused, unreachable or timed out)."""


def _check_lr(lr: np.ndarray) -> np.ndarray:
    x = np.asarray(lr)
    want = f"[N, 1, {LR_SIZE}, {LR_SIZE}]"
    if x.ndim != 4 or x.shape[1:] != (1, LR_SIZE, LR_SIZE) or x.shape[0] < 1:
        raise ValueError(f"LR must have shape {want}, got {x.shape} (use lr[None, None])")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"LR must be floating point in [0, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("LR contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"LR intensities must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return np.ascontiguousarray(x, dtype=np.float32)


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
        max_batch: largest batch sent in one request; bigger inputs are split.
        verbose: tritonclient's request logging.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8000",
        protocol: str = "http",
        model: str = DEFAULT_MODEL,
        timeout_s: float = 300.0,
        max_batch: int = DEFAULT_MAX_BATCH,
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
        self.url = url
        self.protocol = protocol
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_batch = max_batch
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(
                url,
                verbose=verbose,
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
        except (InferenceServerException, OSError) as e:
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

    @_schema_keywords
    def super_resolve(self, lr: np.ndarray, **params: Any) -> np.ndarray:
        """Super-resolve float ``[N, 1, 64, 64]`` in [0, 1] to float32 ``[N, 1, 256, 256]``.

        Sampling controls left as None take the server's defaults. Batches larger than
        ``max_batch`` go out as several requests, each with the same parameters (so with a
        seed, the per-request noise follows the server's rule for a request of that size).
        Raises ``ValueError`` for bad input, ``TypeError`` for an unknown keyword,
        ``SRServerError`` / ``SRConnectionError`` for server-side failures.
        """
        x = _check_lr(lr)
        params = sampling_parameters(**params)
        chunks = [
            self._infer(x[i : i + self.max_batch], params)
            for i in range(0, x.shape[0], self.max_batch)
        ]
        return np.concatenate(chunks, axis=0)

    def _infer(self, x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        tc = self._tc
        inp = tc.InferInput(INPUT_NAME, list(x.shape), "FP32")
        if self.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=True)
            out = tc.InferRequestedOutput(OUTPUT_NAME, binary_data=True)
        else:
            inp.set_data_from_numpy(x)
            out = tc.InferRequestedOutput(OUTPUT_NAME)
        result = self._call(
            "inference",
            self._client.infer,
            self.model,
            [inp],
            outputs=[out],
            parameters=params or None,
            **self._grpc_timeout(),
        )
        sr = result.as_numpy(OUTPUT_NAME)
        want = (x.shape[0], 1, HR_SIZE, HR_SIZE)
        if sr is None or sr.shape != want:
            got = None if sr is None else sr.shape
            raise SRServerError(f"server returned {OUTPUT_NAME} of shape {got}, expected {want}")
        return sr.astype(np.float32, copy=False)
