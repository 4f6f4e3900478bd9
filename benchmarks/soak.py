"""Soak test: a bounded perf_analyzer load on loopback, with the memory of every server process.

    python -m benchmarks.soak --repository build/model_repository_cpu     # make soak

Starts the embedded tritonserver on the repository (127.0.0.1, free ports), then runs
perf_analyzer (``benchmarks.perf``: same binary, libraries and command line) against ``cxr_sr``
over gRPC at ``--concurrency`` for ``--duration-s`` seconds, with real LR images of mixed
sizes (``benchmarks.common.lr_crops``, ``--sizes``) as input data. Throughout the run it
samples the resident memory (RSS) of tritonserver and of every Python stub (one per model
instance). Writes ``outputs/soak.json`` and prints a table:

- failed requests: the server's failure count for ``cxr_sr`` over the run (statistics API),
  plus perf_analyzer's exit status;
- memory growth after warm-up per process, as a fraction: (peak RSS after the warm-up -
  peak RSS until then) / peak RSS until then. 0.05 = 5%. Also the floor growth (the lowest
  RSS of the last 30 s of each phase: what a process keeps between requests). The warm-up
  is a priming round per size, largest first
  (``--concurrency`` requests of that size at once: the largest tensors in flight, and the
  largest dynamic batches of the smaller sizes, which the largest one never forms because
  ``max_batch_pixels`` runs it an image at a time; so Triton's buffers, the Python backend's
  shared-memory pool and every allocator reach their working size), then the first
  ``--warmup-s`` seconds of the load.

Target (exit code 0): no failed request and every process's growth <= ``--max-growth``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    finish,
    lr_crops,
    positive_ints,
    server_log,
    server_version,
    software_versions,
    table,
)
from benchmarks.perf import (
    DEFAULT_PARAMETERS,
    PerfSettings,
    failed_count,
    locate_perf_analyzer,
    missing_libraries,
    parse_csv,
    perf_analyzer_env,
    perf_analyzer_version,
    perf_command,
    write_input_data,
)
from cxr_sr.builders.serve import TritonServer, stub_model

MODEL = "cxr_sr"
WINDOWS = 3  # perf_analyzer measures at least 3 windows before it can call a run stable


def server_processes(pid: int) -> dict[str, psutil.Process]:
    """tritonserver (``pid``) and its Python stubs, keyed ``tritonserver`` and
    ``<model>`` (``<model>#2``, ... for further instances), each stub named by its model
    (``cxr_sr.builders.serve.stub_model``)."""
    root = psutil.Process(pid)
    found = {"tritonserver": root}
    for child in root.children(recursive=True):
        try:
            name = stub_model(child.cmdline())
        except psutil.Error:
            continue
        if name is None:
            continue
        key, n = name, 1
        while key in found:
            n += 1
            key = f"{name}#{n}"
        found[key] = child
    return found


def rss_mib(processes: dict[str, psutil.Process]) -> dict[str, float | None]:
    """Resident memory of each process in MiB (None once it has gone)."""
    out: dict[str, float | None] = {}
    for name, proc in processes.items():
        try:
            out[name] = proc.memory_info().rss / 2**20
        except psutil.Error:
            out[name] = None
    return out


class MemorySampler(threading.Thread):
    """Samples :func:`rss_mib` every ``interval_s`` seconds until stopped:
    ``samples`` is a list of (seconds since start, {process: MiB})."""

    def __init__(self, processes: dict[str, psutil.Process], interval_s: float = 2.0) -> None:
        super().__init__(daemon=True, name="soak-rss")
        self.processes = processes
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float | None]]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, rss_mib(self.processes)))
            if self._halt.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class ProcessMemory:
    """One process (MiB): peak RSS until the end of the warm-up and after it, and ``growth``
    = (peak after - peak before) / peak before (the target); the floor (lowest RSS over the
    last ``FLOOR_WINDOW_S`` of the warm-up and of the run: what it keeps between requests)
    and ``floor_growth`` the same way. None when a process vanished."""

    process: str
    warm_peak_mib: float | None
    peak_after_mib: float | None
    growth: float | None
    warm_floor_mib: float | None
    end_floor_mib: float | None
    floor_growth: float | None


FLOOR_WINDOW_S = 30.0


def memory_growth(
    samples: list[tuple[float, dict[str, float | None]]],
    warmup_s: float,
    window_s: float = FLOOR_WINDOW_S,
) -> list[ProcessMemory]:
    """Per process: the :class:`ProcessMemory` of ``samples`` (seconds, {process: MiB})
    with the warm-up ending at ``warmup_s``."""
    names = list(samples[0][1]) if samples else []
    end_t = samples[-1][0] if samples else 0.0
    out = []
    for name in names:
        warm = [(t, m[name]) for t, m in samples if t <= warmup_s and m.get(name) is not None]
        after = [(t, m.get(name)) for t, m in samples if t > warmup_s]
        if not warm or not after or any(v is None for _, v in after):
            peak = max((v for _, v in warm), default=None)
            out.append(ProcessMemory(name, peak, None, None, None, None, None))
            continue
        warm_peak, peak = max(v for _, v in warm), max(v for _, v in after)
        warm_floor = min(v for t, v in warm if t > warmup_s - window_s)
        end_floor = min(v for t, v in after if t > end_t - window_s)
        growth = (peak - warm_peak) / warm_peak
        floor_growth = (end_floor - warm_floor) / warm_floor
        out.append(
            ProcessMemory(name, warm_peak, peak, growth, warm_floor, end_floor, floor_growth)
        )
    return out


def succeeded_count(url: str, model: str = MODEL) -> int | None:
    """The server's cumulative successful-request count for ``model`` (the success twin of
    ``benchmarks.perf.failed_count``); None when the statistics cannot be read."""
    try:
        stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    except Exception:  # noqa: BLE001 - None means unknown
        return None
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])


def prime(url: str, lr: np.ndarray, parameters: dict[str, Any]) -> None:
    """All of ``lr`` [N, 1, H, W] at once, one image per request: the largest tensors at the
    full concurrency, so that every pool (Triton's and the Python backend's shared memory,
    allocator caches) reaches its working size before memory is measured. RuntimeError on a
    failed request."""
    client = grpcclient.InferenceServerClient(url)
    done = threading.Semaphore(0)
    errors: list[str] = []

    def finished(result, error) -> None:
        if error is not None:
            errors.append(str(error))
        done.release()

    for x in lr:
        request = grpcclient.InferInput("LR", [1, *x.shape], "FP32")
        request.set_data_from_numpy(x[None])
        client.async_infer(MODEL, [request], finished, parameters=parameters)
    for _ in lr:
        done.acquire()
    client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} priming requests failed: {errors[0]}")


def run_perf(
    url: str,
    data: Path,
    workdir: Path,
    *,
    concurrency: int,
    duration_s: float,
    parameters: dict[str, Any],
) -> tuple[int, dict[str, float] | None, str]:
    """perf_analyzer for about ``duration_s`` seconds: :data:`WINDOWS` windows of a third
    each, a stability margin wide enough that it never searches for more.
    Returns (exit code, CSV row or None, console output)."""
    binary = locate_perf_analyzer()
    env = perf_analyzer_env()
    missing = missing_libraries(binary, env)
    if missing:
        raise RuntimeError(
            f"perf_analyzer cannot load {', '.join(missing)}: install Debian's libb64-0d "
            "and the pip package nvidia-cuda-runtime-cu12"
        )
    settings = PerfSettings(
        parameters=parameters,
        measurement_ms=max(1000, int(duration_s * 1000 / WINDOWS)),
        stability_percentage=1000.0,
        max_trials=WINDOWS,
    )
    csv_path = workdir / "soak.csv"
    cmd = perf_command(
        binary,
        model=MODEL,
        url=url,
        concurrency=concurrency,
        input_data=data,
        csv_path=csv_path,
        settings=settings,
    )
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        timeout=duration_s * 3 + 300,
        check=False,
    )
    row = parse_csv(csv_path)[0] if csv_path.is_file() else None
    return done.returncode, row, done.stdout + done.stderr


def soak(
    repository: Path,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    sizes: list[int],
    per_size: int,
    parameters: dict[str, Any],
    log: Path | None = None,
    interval_s: float = 2.0,
) -> dict[str, Any]:
    """Start a server on ``repository``, load it, sample memory; the report as a dict."""
    with tempfile.TemporaryDirectory(prefix="cxr-soak-") as tmp:
        work = Path(tmp)
        data = write_input_data(
            work / "lr.json", [lr_crops(s, per_size, seed=i) for i, s in enumerate(sizes)]
        )
        t0 = time.monotonic()
        with TritonServer(repository, log_file=log) as server:
            start_s = time.monotonic() - t0
            url = server.grpc_url
            triton = server_version(url)
            before = failed_count(url, MODEL), succeeded_count(url)
            sampler = MemorySampler(server_processes(server.process.pid), interval_s)
            sampler.start()
            t1 = time.monotonic()
            try:
                for side in sorted(sizes, reverse=True):  # every size at full concurrency
                    prime(url, lr_crops(side, concurrency, seed=99), parameters)
                prime_s = time.monotonic() - t1
                code, row, console = run_perf(
                    url,
                    data,
                    work,
                    concurrency=concurrency,
                    duration_s=duration_s,
                    parameters=parameters,
                )
            finally:
                sampler.stop()
            load_s = time.monotonic() - t1 - prime_s
            after = failed_count(url, MODEL), succeeded_count(url)
            t2 = time.monotonic()
        stop_s = time.monotonic() - t2
    failed, done = (
        b - a if a is not None and b is not None else None
        for a, b in zip(before, after, strict=True)
    )
    memory = memory_growth(sampler.samples, prime_s + warmup_s)
    lines = [x for x in console.splitlines() if x.strip()]
    return {
        "benchmark": "soak",
        "model": MODEL,
        "repository": str(repository),
        "concurrency": concurrency,
        "sizes": sizes,
        "images_per_size": per_size,
        "parameters": parameters,
        "durations_s": {
            "server_start": round(start_s, 2),
            "prime": round(prime_s, 2),
            "load": round(load_s, 2),
            "warmup": warmup_s,
            "server_stop": round(stop_s, 2),
        },
        "perf_analyzer_exit": code,
        "perf_analyzer_error": None if code == 0 else (lines[-1] if lines else ""),
        "failed_requests": failed,
        "completed_requests": done,
        "throughput_img_s": None if row is None else row.get("Inferences/Second"),
        "p50_ms": None if row is None else row["p50 latency"] / 1000,
        "p99_ms": None if row is None else row["p99 latency"] / 1000,
        "memory": [asdict(m) for m in memory],
        "rss_samples": [{"t": round(t, 1), **m} for t, m in sampler.samples],
        "triton": triton,
    }


def verdict(report: dict[str, Any], max_growth: float) -> list[str]:
    """What misses the target (empty: passed)."""
    problems = []
    if report["failed_requests"] is None:
        problems.append("failed-request count unknown (server statistics unreadable)")
    elif report["failed_requests"] > 0:
        problems.append(f"{report['failed_requests']} failed requests")
    if report["perf_analyzer_exit"] != 0:
        problems.append(
            f"perf_analyzer exited {report['perf_analyzer_exit']}: {report['perf_analyzer_error']}"
        )
    for m in report["memory"]:
        if m["growth"] is None:
            problems.append(f"{m['process']}: no memory figure (process gone?)")
        elif m["growth"] > max_growth:
            problems.append(f"{m['process']}: memory grew {m['growth']:.1%} > {max_growth:.0%}")
    return problems


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value:+.1%}"


MEMORY_HEADERS = (
    "process",
    "peak before MiB",
    "peak after MiB",
    "growth",
    "floor before",
    "floor at end",
    "floor growth",
)


def memory_rows(report: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            m["process"],
            m["warm_peak_mib"],
            m["peak_after_mib"],
            _pct(m["growth"]),
            m["warm_floor_mib"],
            m["end_floor_mib"],
            _pct(m["floor_growth"]),
        ]
        for m in report["memory"]
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(
        "soak",
        __doc__,
        "built repository to serve",
        steps=DEFAULT_PARAMETERS["steps"],
        report="outputs/soak.json",
    )
    p.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)"
    )
    p.add_argument(
        "--duration-s",
        type=float,
        default=180.0,
        help="seconds of load (perf_analyzer's three windows; default: %(default)s)",
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        default=45.0,
        help="first seconds of the load that set each process's reference memory "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--sizes",
        type=positive_ints,
        default=[32, 64, 128, 256],
        help="LR sides of the input images, comma-separated (default: 32,64,128,256)",
    )
    p.add_argument(
        "--images-per-size",
        type=int,
        default=2,
        help="real LR crops per size (default: %(default)s)",
    )
    p.add_argument(
        "--max-growth",
        type=float,
        default=0.10,
        help="largest memory growth after warm-up that passes, as a fraction "
        "(default: %(default)s)",
    )
    p.add_argument("--interval-s", type=float, default=2.0, help="seconds between memory samples")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.images_per_size < 1 or args.steps < 1:
        p.error("--concurrency, --images-per-size and --steps must be >= 1")
    if not 0 <= args.warmup_s < args.duration_s:
        p.error("--warmup-s must be >= 0 and shorter than --duration-s")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    parameters = {**DEFAULT_PARAMETERS, "steps": args.steps}
    log = server_log(args.out)
    print(
        f"[soak] {args.repository}: concurrency {args.concurrency} for {args.duration_s:g} s, "
        f"LR sides {','.join(map(str, args.sizes))}, warm-up {args.warmup_s:g} s",
        flush=True,
    )
    try:
        report = soak(
            args.repository,
            concurrency=args.concurrency,
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            sizes=args.sizes,
            per_size=args.images_per_size,
            parameters=parameters,
            log=log,
            interval_s=args.interval_s,
        )
    except (FileNotFoundError, RuntimeError, TimeoutError, subprocess.TimeoutExpired) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    versions = software_versions(report.pop("triton"))
    versions["perf_analyzer"] = perf_analyzer_version(locate_perf_analyzer(), perf_analyzer_env())
    report["device"] = device_info()
    report["versions"] = versions
    problems = verdict(report, args.max_growth)
    report["max_growth"] = args.max_growth
    report["passed"] = not problems
    report["problems"] = problems
    print(describe(report["device"], versions))
    d = report["durations_s"]
    print(
        f"load {d['load']:.0f} s at concurrency {args.concurrency}: "
        f"{report['completed_requests'] or '?'} requests, "
        f"{report['throughput_img_s'] or 0:.2f} img/s, p50 {report['p50_ms'] or 0:.0f} ms, "
        f"p99 {report['p99_ms'] or 0:.0f} ms; failed requests: {report['failed_requests']}; "
        f"server start {d['server_start']:.1f} s, stop {d['server_stop']:.1f} s"
    )
    print(table(MEMORY_HEADERS, memory_rows(report)))
    passed = f"no failed request, memory growth <= {args.max_growth:.0%}"
    return finish("soak", args.out, report, problems, passed)


if __name__ == "__main__":
    sys.exit(main())
