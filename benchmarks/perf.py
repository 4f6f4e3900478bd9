"""Load-test ``cxr_sr`` with the real ``perf_analyzer``: a concurrency sweep per LR size.

    python -m benchmarks.perf --repository build/model_repository_cpu \
        --sizes 64,128 --concurrency 1,2,4,8,16 --request-count 32      (``make perf``)

Starts the embedded tritonserver on the repository (127.0.0.1, free ports) or uses a
running one (``--url``, gRPC). For each LR side of ``--sizes`` and each concurrency level,
``perf_analyzer`` (2.51, from the ``tritonclient`` wheel, matching the server) sends batch-1
requests over gRPC, the only protocol its ``--request-parameter`` supports in 2.51, with the
sampling flags (one per key of the request schema, ``cxr_sr.sampling.REQUEST_PARAMS``) as
request parameters and real LR images as input data (native-scale crops of the bundled
radiograph, ``benchmarks.common.lr_crops``; without ``--sizes``, 64x64 ones at the reference
protocol). Its default random inputs fall outside [0, 1] and the server rejects them.
Results come from its CSV report (``-f``); failed requests are counted from the server's
statistics.

Writes ``outputs/perf.csv`` (one row per size and concurrency: images/s, output MP/s,
latency percentiles, server queue and compute time, failed requests), ``outputs/perf.png``
(p50 and p95 latency against throughput, one line per size) and ``outputs/bench_perf.json``.
Exit status 1 when a level failed or the server counted a failed request.

perf_analyzer needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (the pip package
``nvidia-cuda-runtime-cu12``, in the dev extra): :func:`perf_analyzer_env` puts the latter
on ``LD_LIBRARY_PATH``; :func:`missing_libraries` says what is still missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    lr_crops,
    lr_images,
    positive_ints,
    server_log,
    server_version,
    software_versions,
    table,
    write_json,
)
from cxr_sr.imaging import SCALE
from cxr_sr.serving import add_arguments, namespace_parameters, request_parameters

UNSTABLE_EXIT = 2  # perf_analyzer: "Failed to obtain stable measurement"
# perf_analyzer: "No valid requests recorded within time interval" (a request takes longer
# than the window: large images at high concurrency on a CPU)
NO_REQUESTS_EXIT = 3
DEFAULT_PARAMETERS = {"steps": 1, "seed": 0}  # 1 step: the demo checkpoint's default
SHARED_MEMORY = ("none", "system")  # perf_analyzer's --shared-memory ("cuda" needs a GPU client)
# perf_analyzer 2.51's --request-parameter types are bool, int and string; the server parses
# a number sent as a string exactly as the number itself
_PERF_TYPES = {bool: "bool", int: "int"}


def locate_perf_analyzer() -> Path:
    """The ``perf_analyzer`` binary: next to this Python (the venv's bin/) or on ``PATH``."""
    here = Path(sys.executable).parent / "perf_analyzer"
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "perf_analyzer not found: it ships in the tritonclient==2.51.0 wheel "
        "(pip install -e '.[dev]'), or use the NGC SDK image (docker/README.md)"
    )


def cuda_runtime_libdir() -> Path | None:
    """The folder holding ``libcudart.so.12`` from the pip package nvidia-cuda-runtime-cu12."""
    try:
        import nvidia.cuda_runtime as cuda_runtime
    except ImportError:
        return None
    for root in cuda_runtime.__path__:
        lib = Path(root) / "lib"
        if (lib / "libcudart.so.12").is_file():
            return lib
    return None


def perf_analyzer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the CUDA runtime on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    lib = cuda_runtime_libdir()
    if lib is not None:
        paths = [str(lib), *(p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def missing_libraries(binary: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Shared libraries ``binary`` cannot find under ``env`` (``ldd``'s "not found" lines)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    out = subprocess.run(
        [ldd, str(binary)],
        capture_output=True,
        text=True,
        env=dict(env or perf_analyzer_env()),
        timeout=30,
        check=False,
    ).stdout
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def perf_analyzer_version(binary: Path, env: Mapping[str, str]) -> str | None:
    """``perf_analyzer --version`` -> "2.51.0" (None when it cannot run)."""
    try:
        done = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Version\s+(\S+)", done.stdout + done.stderr)
    return match.group(1) if match else None


def write_input_data(
    path: str | Path, lr: np.ndarray | Sequence[np.ndarray], name: str = "LR"
) -> Path:
    """perf_analyzer ``--input-data`` JSON: one batch-1 entry per image of ``lr`` [N, 1, H, W],
    or of each array of a sequence of them (sizes may differ between arrays: mixed sizes)."""
    arrays = [lr] if isinstance(lr, np.ndarray) else list(lr)
    entries = []
    for array in arrays:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 4 or array.shape[1] != 1:
            raise ValueError(f"lr must be [N, 1, H, W], got shape {array.shape}")
        entries += [
            {name: {"content": [float(v) for v in x.ravel()], "shape": list(x.shape)}}
            for x in array
        ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


@dataclass(frozen=True)
class PerfSettings:
    """How perf_analyzer measures one concurrency level.

    ``parameters``: the request parameters sent with every request, keys of the request
    schema only (validated here as the client does). ``shared_memory`` "system": inputs and
    outputs go through POSIX shared memory regions registered with the server instead of the
    gRPC messages (client and server on one host), so a level measures the server without the
    transfer; ``output_bytes`` is then the region size per output (:func:`sweep` sets it from
    the LR side: the SR's float32 bytes).
    """

    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMETERS))
    measurement_ms: int = 5000
    stability_percentage: float = 25.0
    max_trials: int = 8
    request_count: int = 0  # > 0: one window of that many requests, no stability search
    shared_memory: str = "none"
    output_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", request_parameters(self.parameters))
        if self.shared_memory not in SHARED_MEMORY:
            raise ValueError(
                f"shared_memory must be one of {SHARED_MEMORY}, got {self.shared_memory!r}"
            )


def perf_command(
    binary: Path,
    *,
    model: str,
    url: str,
    concurrency: int,
    input_data: Path,
    csv_path: Path,
    settings: PerfSettings,
) -> list[str]:
    """The perf_analyzer argument list for one concurrency level (gRPC, batch 1)."""
    cmd = [
        str(binary),
        "-m",
        model,
        "-i",
        "grpc",
        "-u",
        url,
        "-b",
        "1",
        "--input-data",
        str(input_data),
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(settings.measurement_ms),
        "--stability-percentage",
        str(settings.stability_percentage),
        "--max-trials",
        str(settings.max_trials),
        "-f",
        str(csv_path),
    ]
    if settings.request_count > 0:
        cmd += ["--request-count", str(settings.request_count)]
    if settings.shared_memory != "none":
        if settings.output_bytes < 1:
            raise ValueError("shared memory needs output_bytes, the largest output's size")
        cmd += [f"--shared-memory={settings.shared_memory}"]
        cmd += ["--output-shared-memory-size", str(settings.output_bytes)]
    for key, value in settings.parameters.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        cmd += ["--request-parameter", f"{key}:{text}:{_PERF_TYPES.get(type(value), 'string')}"]
    return cmd


def parse_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a perf_analyzer ``-f`` report, every value as float (latencies in usec)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if k and v} for row in csv.DictReader(f)]


@dataclass
class PerfResult:
    """One concurrency level: throughput in images/s, latencies in ms.

    ``stable`` is False when the time-window search did not settle within ``max_trials``
    windows and the level was measured again over a fixed request count instead.
    ``failed_requests``: the server's failure count for the model over the run.
    ``lr_side``: the side of the square LR inputs (None: the 64x64 reference-protocol set).
    ``models``: what each model of the server did during the level (:func:`model_activity`:
    the batches its dynamic batcher formed, queue and compute ms per request).
    ``request_count``: the requests of a fixed-count measurement (None: a time window).
    """

    concurrency: int
    throughput: float | None
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    server_queue_ms: float | None
    server_compute_ms: float | None
    failed_requests: int | None
    stable: bool
    returncode: int
    error: str | None = None
    lr_side: int | None = None
    models: dict[str, dict[str, float]] | None = None
    request_count: int | None = None  # fixed-count measurement: the requests in its window
    model: str | None = None  # the load-tested model (the one ``models`` are counted against)

    @property
    def queue_ms(self) -> float | None:
        """ms a request of the load-tested model waited in the queues of the models it went
        through, from the server's statistics (``models``): each other model's queue time
        over the level, per request of this one. perf_analyzer's own figure for an ensemble is
        the ensemble's queue, which is always ~0 (``server_queue_ms``); None without
        statistics."""
        if not self.models or self.model not in self.models:
            return None
        others = (m for name, m in self.models.items() if name != self.model)
        waited = sum(m["queue_ms"] * m["requests"] for m in others)
        return waited / self.models[self.model]["requests"]

    @property
    def output_mp_per_s(self) -> float | None:
        """Output megapixels per second (throughput x the SR image's pixels)."""
        if self.throughput is None:
            return None
        return self.throughput * (SCALE * (self.lr_side or 64)) ** 2 / 1e6

    @classmethod
    def from_row(
        cls, row: Mapping[str, float], *, failed: int | None, stable: bool, returncode: int
    ) -> PerfResult:
        ms = 1e-3
        compute = sum(
            row.get(k, 0.0)
            for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
        )
        return cls(
            concurrency=int(row["Concurrency"]),
            throughput=row["Inferences/Second"],
            p50_ms=row["p50 latency"] * ms,
            p90_ms=row["p90 latency"] * ms,
            p95_ms=row["p95 latency"] * ms,
            p99_ms=row["p99 latency"] * ms,
            server_queue_ms=row.get("Server Queue", 0.0) * ms,
            server_compute_ms=compute * ms,
            failed_requests=failed,
            stable=stable,
            returncode=returncode,
        )


STAT_TIMES = ("queue", "compute_input", "compute_infer", "compute_output")


def model_statistics(url: str) -> dict[str, dict[str, int]] | None:
    """Every loaded model's cumulative counters from the server's statistics (gRPC), summed
    over its versions: ``requests`` (images), ``executions`` (batches the model ran),
    ``failed``, the ns of each of :data:`STAT_TIMES` (per request: a batch's time counts once
    for each of its requests) and ``busy_ns``, the compute time of its executions (each batch
    once); None when they cannot be read."""
    try:
        import tritonclient.grpc as grpcclient

        stats = grpcclient.InferenceServerClient(url).get_inference_statistics(as_json=True)
    except Exception:  # noqa: BLE001 - statistics are a bonus; None means unknown
        return None
    out: dict[str, dict[str, int]] = {}
    for m in stats.get("model_stats", []):
        keys = ("requests", "executions", "failed", *(f"{k}_ns" for k in STAT_TIMES), "busy_ns")
        c = out.setdefault(m["name"], dict.fromkeys(keys, 0))
        inference = m.get("inference_stats", {})
        c["requests"] += int(m.get("inference_count", 0))
        c["executions"] += int(m.get("execution_count", 0))
        c["failed"] += int(inference.get("fail", {}).get("count", 0))
        for k in STAT_TIMES:
            c[f"{k}_ns"] += int(inference.get(k, {}).get("ns", 0))
        for size in m.get("batch_stats", []):
            c["busy_ns"] += int(size.get("compute_infer", {}).get("ns", 0))
    return out


def failed_count(url: str, model: str) -> int | None:
    """The server's cumulative failed-inference count for ``model`` (gRPC statistics)."""
    stats = model_statistics(url)
    return None if stats is None or model not in stats else stats[model]["failed"]


def model_activity(
    before: Mapping[str, Mapping[str, int]] | None, after: Mapping[str, Mapping[str, int]] | None
) -> dict[str, dict[str, float]] | None:
    """What each model did between two :func:`model_statistics` snapshots: ``requests``,
    ``executions``, ``mean_batch`` (images per execution: what the dynamic batcher formed)
    and, per request, ms queued and in compute (input, infer, output: a batch's time counts
    once for each of its requests) and ``busy_ms``, the request's share of the model's busy
    time (each batch once). Models that served nothing are left out; None when a snapshot
    is."""
    if before is None or after is None:
        return None
    activity = {}
    for name, a in after.items():
        b = before.get(name, {})
        n = a["requests"] - b.get("requests", 0)
        if n <= 0:
            continue
        runs = a["executions"] - b.get("executions", 0)
        row = {"requests": n, "executions": runs, "mean_batch": n / runs if runs > 0 else None}
        for k in (*STAT_TIMES, "busy"):
            row[f"{k}_ms"] = (a.get(f"{k}_ns", 0) - b.get(f"{k}_ns", 0)) / n / 1e6
        activity[name] = row
    return activity


def run_level(
    binary: Path,
    env: Mapping[str, str],
    *,
    model: str,
    url: str,
    concurrency: int,
    input_data: Path,
    workdir: Path,
    settings: PerfSettings,
    timeout_s: float,
) -> tuple[PerfResult, str]:
    """One perf_analyzer run; returns the result and its console output.

    When the time-window search does not stabilise (exit code 2, common on a shared 2-core
    machine) or no request finished within a window (exit code 3: large images at high
    concurrency), the level is measured again over a fixed request count (two per client,
    at least 8) and marked unstable.

    A fixed-count window lasts at least one second in perf_analyzer 2.51: requests that all
    finish sooner are divided by that second (measured here: 8 and 64 requests at LR 16 on
    the CPU read 7.99 and 63.95 img/s; on an H100, 32 requests read 32 img/s where the
    latencies said ~800). Where a count window sat at that floor and the latencies say the
    server was faster (:func:`count_window_floored`), the count is raised
    (:func:`larger_count`) and the level measured again, up to :data:`COUNT_RETRIES` times;
    ``request_count`` in the result is the count that was measured.
    """
    csv_path = workdir / f"perf_c{concurrency}.csv"
    before = model_statistics(url)
    attempt = settings
    fell_back = False
    log = ""
    row: dict[str, float] | None = None
    raised = 0
    while True:
        csv_path.unlink(missing_ok=True)
        cmd = perf_command(
            binary,
            model=model,
            url=url,
            concurrency=concurrency,
            input_data=input_data,
            csv_path=csv_path,
            settings=attempt,
        )
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(env), timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            return _failed(concurrency, -1, f"perf_analyzer ran past {timeout_s:.0f} s"), log
        log += done.stdout + done.stderr
        unsettled = done.returncode in (UNSTABLE_EXIT, NO_REQUESTS_EXIT)
        if unsettled and attempt.request_count == 0:
            fell_back = True
            attempt = replace(settings, request_count=max(8, 2 * concurrency))
            continue
        row = parse_csv(csv_path)[0] if done.returncode == 0 and csv_path.is_file() else None
        if (
            row is not None
            and raised < COUNT_RETRIES
            and count_window_floored(row, attempt.request_count)
        ):
            raised += 1
            count = larger_count(row, attempt.request_count, attempt.measurement_ms)
            log += f"\n[perf] count window at its 1 s floor: measuring again over {count}\n"
            attempt = replace(attempt, request_count=count)
            continue
        break
    after = model_statistics(url)
    failed = None
    if before is not None and after is not None and model in after:
        failed = after[model]["failed"] - before.get(model, {}).get("failed", 0)
    activity = model_activity(before, after)
    if row is None:
        lines = [line for line in log.splitlines() if line.strip()]
        reason = next((x for x in lines if "error" in x.lower()), lines[-1] if lines else "")
        result = _failed(concurrency, done.returncode, reason, failed)
    else:
        result = PerfResult.from_row(row, failed=failed, stable=not fell_back, returncode=0)
        result.request_count = attempt.request_count or None
    result.models = activity
    result.model = model
    return result, log


# perf_analyzer 2.51's fixed-count window lasts at least this long (see run_level)
COUNT_WINDOW_FLOOR_S = 1.0
COUNT_RETRIES = 3  # raised counts per level at most
MAX_REQUEST_COUNT = 200_000


def _rate_by_latency(row: Mapping[str, float]) -> float | None:
    """Requests per second that the level's clients could complete at its median latency
    (concurrency / p50); None without a latency."""
    p50_s = row.get("p50 latency", 0.0) * 1e-6
    return row.get("Concurrency", 1.0) / p50_s if p50_s > 0 else None


def count_window_floored(row: Mapping[str, float], count: int) -> bool:
    """Whether a fixed-count measurement of ``count`` requests (a perf_analyzer CSV row) was
    divided by the window's 1 s floor rather than by the time the requests took: the window
    was within 10% of the floor and the latencies (concurrency / p50) say requests finished
    at least 1.5x faster than the reported throughput."""
    throughput = row.get("Inferences/Second", 0.0)
    by_latency = _rate_by_latency(row)
    if count <= 0 or throughput <= 0 or by_latency is None:
        return False
    window_s = count / throughput
    return window_s <= 1.1 * COUNT_WINDOW_FLOOR_S and by_latency >= 1.5 * throughput


def larger_count(row: Mapping[str, float], count: int, measurement_ms: int) -> int:
    """The request count for a window of about ``measurement_ms`` (at least 2 s) at the rate
    the latencies give (concurrency / p50), at least 4x ``count``, at most
    :data:`MAX_REQUEST_COUNT`."""
    target = math.ceil((_rate_by_latency(row) or 0.0) * max(2.0, measurement_ms / 1000))
    return min(MAX_REQUEST_COUNT, max(4 * count, target))


def _failed(concurrency: int, code: int, reason: str, failed: int | None = None) -> PerfResult:
    return PerfResult(
        concurrency, None, None, None, None, None, None, None, failed, False, code, reason.strip()
    )


def sweep(
    url: str,
    levels: Sequence[int],
    settings: PerfSettings,
    *,
    model: str = "cxr_sr",
    sizes: Sequence[int] | None = None,
    images: int = 8,
    seed: int = 0,
    timeout_s: float = 900.0,
    verbose: bool = False,
) -> list[PerfResult]:
    """perf_analyzer at each concurrency level against the gRPC server at ``url``, for each
    LR side of ``sizes`` (``images`` native-scale crops of that side as input data; None:
    64x64 LR images at the reference protocol)."""
    binary = locate_perf_analyzer()
    env = perf_analyzer_env()
    missing = missing_libraries(binary, env)
    if missing:
        raise RuntimeError(
            f"perf_analyzer cannot load {', '.join(missing)}: install Debian's libb64-0d "
            "(apt-get install -y libb64-0d) and the pip package nvidia-cuda-runtime-cu12"
        )
    results = []
    with tempfile.TemporaryDirectory(prefix="cxr-perf-") as tmp:
        work = Path(tmp)
        for side in sizes or [None]:
            lr = lr_images(images, seed=seed) if side is None else lr_crops(side, images, seed)
            data = write_input_data(work / f"lr_{side}.json", lr)
            sr_bytes = 4 * int(np.prod(lr.shape[1:])) * SCALE * SCALE  # float32 SR per image
            level_settings = replace(settings, output_bytes=max(settings.output_bytes, sr_bytes))
            for level in levels:
                result, log = run_level(
                    binary,
                    env,
                    model=model,
                    url=url,
                    concurrency=level,
                    input_data=data,
                    workdir=work,
                    settings=level_settings,
                    timeout_s=timeout_s,
                )
                result.lr_side = side
                if verbose:
                    print(log)
                size = f"LR {side or 64}"
                print(f"[perf] {size} concurrency {level}: {_summary(result)}", flush=True)
                results.append(result)
    return results


def _summary(r: PerfResult) -> str:
    if r.error:
        return f"FAILED (exit {r.returncode}): {r.error}"
    note = "" if r.stable else " (unstable: fixed request count)"
    batches = ", ".join(
        f"{name} {m['mean_batch']:.1f}"
        for name, m in (r.models or {}).items()
        if m.get("mean_batch") is not None
    )
    batches = f"; mean batch: {batches}" if batches else ""
    return f"{r.throughput:.2f} img/s, p50 {r.p50_ms:.0f} ms{note}{batches}"


HEADERS = (
    "LR side",
    "concurrency",
    "img/s",
    "out MP/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "queue ms",
    "compute ms",
    "failed",
    "stable",
)


def result_rows(results: Sequence[PerfResult]) -> list[list[Any]]:
    return [
        [
            r.lr_side or 64,
            r.concurrency,
            r.throughput,
            r.output_mp_per_s,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.server_queue_ms if r.queue_ms is None else r.queue_ms,
            r.server_compute_ms,
            r.failed_requests,
            "yes" if r.stable else "no",
        ]
        for r in results
    ]


CSV_FIELDS = (
    "lr_side",
    "concurrency",
    "throughput",
    "output_mp_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "server_queue_ms",
    "queue_ms",
    "server_compute_ms",
    "failed_requests",
    "stable",
    "error",
)


def write_csv(path: str | Path, results: Sequence[PerfResult]) -> Path:
    """One row per (LR side, concurrency): :data:`CSV_FIELDS`, throughput in images/s,
    latencies in ms."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {**asdict(r), "output_mp_per_s": r.output_mp_per_s, "lr_side": r.lr_side or 64}
            row["queue_ms"] = r.queue_ms
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    return path


def plot(path: str | Path, results: Sequence[PerfResult], title: str) -> Path:
    """Latency (p50 solid, p95 dashed) against throughput, one colour per LR side, each point
    labelled with its concurrency."""
    import matplotlib  # lazy: plotting is optional for the sweep itself

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side in dict.fromkeys(r.lr_side for r in results):
        ok = [r for r in results if r.lr_side == side and r.error is None]
        if not ok:
            continue
        x = [r.throughput for r in ok]
        label = f"LR {side or 64} -> {SCALE * (side or 64)}"
        (line,) = ax.plot(x, [r.p50_ms for r in ok], "o-", label=f"{label} p50")
        ax.plot(x, [r.p95_ms for r in ok], "s--", color=line.get_color(), label=f"{label} p95")
        for r in ok:
            ax.annotate(
                f"c{r.concurrency}",
                (r.throughput, r.p50_ms),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("throughput (images / s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(
        "perf", __doc__, "built repository to serve with the embedded tritonserver"
    )
    p.add_argument(
        "--url",
        default=None,
        help="gRPC address host:port of a running server; then --repository is not served",
    )
    p.add_argument("--model", default="cxr_sr", help="model to load-test (default: %(default)s)")
    p.add_argument(
        "--concurrency",
        type=positive_ints,
        default=[1, 2, 4],
        help="comma-separated concurrency levels (default: 1,2,4)",
    )
    p.add_argument(
        "--sizes",
        type=positive_ints,
        default=None,
        help="LR sides, comma-separated: a sweep per side with native-scale crops of that "
        "side (default: one sweep with 64x64 LR images at the reference protocol)",
    )
    add_arguments(p, DEFAULT_PARAMETERS)  # one flag per request-schema key
    p.add_argument(
        "--measurement-ms",
        type=int,
        default=5000,
        help="perf_analyzer measurement window in ms (default: %(default)s)",
    )
    p.add_argument(
        "--stability",
        type=float,
        default=25.0,
        help="perf_analyzer --stability-percentage; a shared 2-core machine needs ~25 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-trials",
        type=int,
        default=8,
        help="measurement windows before a level counts as unstable (default: %(default)s)",
    )
    p.add_argument(
        "--request-count",
        type=int,
        default=0,
        help="> 0: measure each level over exactly this many requests (no stability search)",
    )
    p.add_argument(
        "--images", type=int, default=8, help="distinct LR images in the input data (default: 8)"
    )
    p.add_argument(
        "--shared-memory",
        choices=SHARED_MEMORY,
        default="none",
        help="system: inputs and outputs through shared memory instead of gRPC messages "
        "(perf_analyzer on the server's host): the server's throughput without the transfer "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds allowed per perf_analyzer run"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/bench_perf.json"),
        help="JSON results (default: %(default)s)",
    )
    p.add_argument(
        "--csv",
        type=Path,
        default=Path("outputs/perf.csv"),
        help="one row per LR side and concurrency (default: %(default)s)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=Path("outputs/perf.png"),
        help="latency against throughput (default: %(default)s; 'none': no plot)",
    )
    p.add_argument("--verbose", action="store_true", help="print perf_analyzer's own output")
    args = p.parse_args(argv)
    if args.measurement_ms < 100 or args.max_trials < 1 or args.images < 1:
        p.error("--measurement-ms >= 100, --max-trials >= 1 and --images >= 1 are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = PerfSettings(
        parameters=namespace_parameters(args),
        measurement_ms=args.measurement_ms,
        stability_percentage=args.stability,
        max_trials=args.max_trials,
        request_count=args.request_count,
        shared_memory=args.shared_memory,
    )
    kwargs = {
        "model": args.model,
        "sizes": args.sizes,
        "images": args.images,
        "timeout_s": args.timeout,
    }
    try:
        if args.url:
            url = args.url
            results = sweep(url, args.concurrency, settings, verbose=args.verbose, **kwargs)
            triton = server_version(url)
        else:
            from cxr_sr.builders.serve import TritonServer

            log = server_log(args.out)
            with TritonServer(args.repository, log_file=log) as server:
                url = server.grpc_url
                triton = server_version(url)
                results = sweep(url, args.concurrency, settings, verbose=args.verbose, **kwargs)
    except (FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    binary = locate_perf_analyzer()
    versions = software_versions(triton)
    versions["perf_analyzer"] = perf_analyzer_version(binary, perf_analyzer_env())
    device = device_info()
    print()
    print(
        f"perf_analyzer on {args.model}: batch 1, gRPC, "
        f"{', '.join(f'{k}={v}' for k, v in settings.parameters.items())}, "
        f"window {args.measurement_ms} ms, stability {args.stability:g}%, "
        f"shared memory {args.shared_memory}"
    )
    print(describe(device, versions))
    print(table(HEADERS, result_rows(results)))
    write_csv(args.csv, results)
    print(f"wrote {args.csv}")
    if str(args.plot).lower() != "none":
        params = ", ".join(f"{k}={v}" for k, v in settings.parameters.items())
        plot(args.plot, results, f"perf_analyzer, {args.model}, batch 1, {params}\n{device['cpu']}")
        print(f"wrote {args.plot}")
    write_json(
        args.out,
        {
            "benchmark": "perf_analyzer",
            "model": args.model,
            "repository": None if args.url else str(args.repository),
            "url": args.url,
            "settings": asdict(settings),
            "device": device,
            "versions": versions,
            "results": [asdict(r) for r in results],
        },
    )
    print(f"wrote {args.out}")
    failed = sum(r.failed_requests or 0 for r in results)
    if failed or any(r.error for r in results):
        print(
            f"error: {failed} failed requests; levels failed: "
            f"{[r.concurrency for r in results if r.error]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
