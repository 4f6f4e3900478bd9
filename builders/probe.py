"""Health probe: one small real inference through ``cxr_sr``, not only Triton's ready endpoints.

    python -m cxr_sr.builders.probe --url 127.0.0.1:8000 --timeout 30

Triton 2.51 keeps answering 200 on ``/v2/health/ready`` and ``/v2/models/cxr_sr/ready`` after
a Python stub process has died (killed by the OOM killer, say), while every request to that
model fails with 500 "Stub process ... is not healthy". So the probe sends one LR image of the
smallest served side (``lr_min_side`` from the ensemble's config, 16 by default), 1 step,
seed 0, over HTTP (the KServe v2 JSON protocol, standard library only, so it runs in the bare
NGC runtime image and starts fast enough for a Docker HEALTHCHECK or a Kubernetes exec probe)
and checks that ``SR`` comes back with the right shape and finite values in [0, 1].

Prints one line and exits 0 (healthy) or 1 (not). The serve wrapper's watchdog
(``cxr_sr.builders.serve``) calls :func:`probe` in-process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

MODEL = "cxr_sr"
SCALE = 4  # SR side / LR side (cxr_sr.imaging.SCALE; not imported: this module is stdlib-only)
DEFAULT_SIDE = 16


@dataclass(frozen=True)
class ProbeResult:
    """``ok`` with the time the round trip took, or the reason it failed."""

    ok: bool
    seconds: float
    detail: str

    def line(self) -> str:
        state = "healthy" if self.ok else "unhealthy"
        return f"{state}: {self.detail} ({self.seconds:.2f} s)"


def _get_json(url: str, timeout_s: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def _min_side(base: str, model: str, timeout_s: float) -> int:
    """The smallest LR side the model serves (ensemble parameter ``lr_min_side``)."""
    config = _get_json(f"{base}/v2/models/{model}/config", timeout_s)
    value = config.get("parameters", {}).get("lr_min_side", {}).get("string_value")
    return int(value) if value else DEFAULT_SIDE


def probe_image(side: int) -> list[float]:
    """A smooth ramp in [0, 1], ``side`` x ``side``, row-major (the LR of the probe)."""
    return [0.25 + 0.5 * (y + x) / (2 * side - 2) for y in range(side) for x in range(side)]


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read()).get("error", "")[:300]
    except (ValueError, AttributeError, OSError):
        return err.reason or ""


def probe(url: str = "127.0.0.1:8000", timeout_s: float = 30.0, model: str = MODEL) -> ProbeResult:
    """One inference through ``model`` at ``url`` (``host:port``, HTTP); never raises."""
    base = url if "://" in url else f"http://{url}"
    start = time.monotonic()
    try:
        side = _min_side(base, model, timeout_s)
        body = {
            "inputs": [
                {
                    "name": "LR",
                    "shape": [1, 1, side, side],
                    "datatype": "FP32",
                    "data": probe_image(side),
                }
            ],
            "outputs": [{"name": "SR"}],
            "parameters": {"steps": 1, "seed": 0},
        }
        request = urllib.request.Request(
            f"{base}/v2/models/{model}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        left = max(0.1, timeout_s - (time.monotonic() - start))
        with urllib.request.urlopen(request, timeout=left) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as err:
        return ProbeResult(False, time.monotonic() - start, f"HTTP {err.code}: {_error_text(err)}")
    except (OSError, ValueError) as err:  # refused, reset, timed out, not JSON
        reason = getattr(err, "reason", None) or err or type(err).__name__
        return ProbeResult(False, time.monotonic() - start, f"no answer from {base}: {reason}")
    seconds = time.monotonic() - start
    problem = _check_output(answer, side)
    if problem:
        return ProbeResult(False, seconds, problem)
    return ProbeResult(True, seconds, f"{model} answered a {side}x{side} request")


def _check_output(answer: dict, side: int) -> str | None:
    """None when the response holds ``SR`` [1, 1, 4 side, 4 side] finite in [0, 1]."""
    out = next((o for o in answer.get("outputs", []) if o.get("name") == "SR"), None)
    want = [1, 1, SCALE * side, SCALE * side]
    if out is None or out.get("shape") != want:
        return f"bad answer: SR shape {None if out is None else out.get('shape')}, want {want}"
    data = out.get("data") or []
    if len(data) != math.prod(want):
        return f"bad answer: {len(data)} SR values, want {math.prod(want)}"
    if not all(math.isfinite(v) and -1e-3 <= v <= 1 + 1e-3 for v in data):
        return "bad answer: SR holds NaN, infinity or values outside [0, 1]"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--url",
        default="127.0.0.1:8000",
        help="Triton HTTP endpoint, host:port (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds the whole probe may take; under load the request waits in the queue "
        "(default: %(default)s)",
    )
    p.add_argument("--model", default=MODEL, help="ensemble to call (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.timeout > 0:
        p.error(f"--timeout must be positive, got {args.timeout}")
    result = probe(args.url, args.timeout, args.model)
    print(result.line(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
