"""Served ``cxr_sr`` side by side with the same ONNX graphs in one process.

    python -m benchmarks.bench --repository build/model_repository_cpu

One invocation measures, for each LR side of ``--sizes`` (64, 128, 256) and each client count
of ``--concurrency`` (1, 4), the same work two ways, on the same real LR crops (native scale,
``benchmarks.common.lr_crops``), with the same request parameters:

- ``served``: the embedded tritonserver on the repository (or ``--url``); ``c`` gRPC clients
  each send one image at the same moment; a round ends when the last answer is back.
- ``in-process``: the repository's own ``model.onnx`` files in onnxruntime sessions in this
  process (``train.pipeline.OnnxPipeline``: the encoder, ``cxr_sr.sample`` over the UNet, the
  decoder, i.e. what the three network models and the BLS sampler run), warm; the ``c``
  images go through as one batch, in calls of at most the pixels one served network call
  takes (the decoder's ``max_batch_pixels``), as the server's dynamic batcher would.

The in-process side is the best single process, not a handicapped one: before the server
starts, a calibration times every candidate thread setting (one intra-op thread, and all
usable cores with each of ``cxr_sr.ort_cpu.SPIN_MODES``: idle threads sleeping, busy-waiting
only inside a call, or always) on one input of the smallest size (at most LR 128),
interleaved, and keeps the fastest (on a busy machine one thread can beat two). The served
network models then get the same intra-op thread count (``--served-threads match``, through
``CXR_ORT_THREADS``), so the ratio measures what serving adds, not a thread setting; their
idle threads do what the repository's ``intra_op_spinning`` says (the builder's default:
busy-wait only inside a call; three pools spinning between calls on shared cores made
serving ~1.5x slower).

Rounds alternate served / in-process, so load from other processes hits both alike: after
``--warmup``, at least ``--rounds`` of each, then more until a case's timed rounds took
``--min-seconds`` (at most ``--max-rounds``), so the cheap cases, whose single rounds scatter
most, get the most rounds; each figure is the median over rounds. Per case (with its
``rounds``):
``served_ms`` and ``inprocess_ms`` (ms per image: round time / c), their ``ratio`` and output
megapixels per second (``mp_per_s`` served, ``inprocess_mp_per_s``). At c = 1 the served and
in-process SR are compared (``max_abs_diff``): the two sides do the same work. Writes
``outputs/bench.json`` with device, versions, the served models' thread settings, the
calibration and the load average before and after; prints a table. Exit status 0 whatever
the ratios (``--check``: 1 when a ratio exceeds ``--target``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    lr_crops,
    positive_ints,
    repository_sampling,
    server_log,
    server_version,
    software_versions,
    table,
    write_json,
)
from benchmarks.cost import grpc_call, served_sides
from cxr_sr import sample
from cxr_sr.builders.specs import ENSEMBLE, NETWORKS
from cxr_sr.imaging import SCALE
from cxr_sr.noise import legacy_block, noise_keys
from cxr_sr.ort_cpu import SPIN_MODES, lane_count, lane_setting, spin_mode, spin_setting
from cxr_sr.sampling import latent_origin
from cxr_sr.serving import add_arguments, namespace_parameters, parse_parameters, row_chunks

DEFAULT_SIZES = (64, 128, 256)
DEFAULT_CONCURRENCY = (1, 4)
DEFAULT_PARAMETERS = {"steps": 1, "seed": 0}  # 1 step: the committed checkpoint's default
TARGET_RATIO = 1.15
# the calibration holds its four candidate pipelines at once, each with its onnxruntime
# arenas (about 1.5 GB per pipeline after an LR 256 image): LR 128 keeps that small
CALIBRATION_MAX_SIDE = 128
THREADS_ENV = "CXR_ORT_THREADS"  # read by model_repository/onnx_python/model.py
# the served network models' onnxruntime settings worth reporting (config parameters)
THREAD_PARAMETERS = ("intra_op_threads", "intra_op_spinning", "ort_cpu_mem_arena", "cpu_lanes")


# ----------------------------------------------------------------- the two sides


def served_round(calls: Sequence[Callable[[], np.ndarray]]) -> tuple[float, list[np.ndarray]]:
    """Send one request per client at the same moment; (seconds until the last answer, SRs)."""
    if len(calls) == 1:
        t0 = time.perf_counter()
        out = calls[0]()
        return time.perf_counter() - t0, [out]
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls) + 1)

    def client(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except Exception as err:  # noqa: BLE001 - reported below, in the main thread
            results[i] = err

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(calls)} served requests failed: {failed[0]}")
    return elapsed, results


class InProcess:
    """The served pipeline in this process: ``OnnxPipeline`` on the repository's graphs, with
    the request's sampling options and seed, network calls of at most the served
    ``max_batch_pixels``, a batch spread over the lanes the served models use with
    ``threads`` (their ``cpu_lanes``, or ``CXR_ORT_LANES``; ``lanes`` sets it instead)."""

    def __init__(
        self,
        repository: Path,
        params: Mapping[str, Any],
        threads: int,
        spinning: str | bool,
        lanes: int | None = None,
    ):
        # torch: only the benchmark needs it
        from cxr_sr.train.pipeline import OnnxPipeline, find_graph

        for name in NETWORKS:  # a missing graph is the error to report, before the configs
            find_graph(repository, name)
        self.max_pixels = _config_int(repository / NETWORKS[-1], "max_batch_pixels")
        self.lanes = lanes or lane_count(served_lanes(repository), threads)
        self.pipe = OnnxPipeline(
            repository,
            threads=threads,
            spinning=spinning,
            lanes=self.lanes,
            max_pixels=self.max_pixels,
        )
        self.schedule, defaults = repository_sampling(repository)
        self.settings = parse_parameters(dict(params), defaults, self.schedule.num_train_timesteps)
        self.threads, self.spinning = threads, spin_mode(spinning)

    def _one_call(self, lr: np.ndarray) -> np.ndarray:
        """The server's work for ``len(lr)`` batch-1 requests with these settings, sampled
        in one loop: each image is row 0 of its own request (its own noise keys)."""
        opts, seed, origin = self.settings
        pipe, n, f = self.pipe, len(lr), self.pipe.vae_factor
        keys = noise_keys([seed] * n, [1] * n, [latent_origin(origin, f)] * n, legacy_block(f))
        z = sample(pipe.denoise, pipe.encode_lr(lr), self.schedule, opts, keys)
        return pipe.decode(z, lr)

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        """LR [c, 1, H, W] -> SR [c, 1, 4H, 4W], in calls of at most ``max_pixels`` latent
        pixels (what one served decoder call takes)."""
        f = self.pipe.vae_factor
        latent_pixels = (lr.shape[-2] * SCALE // f) * (lr.shape[-1] * SCALE // f)
        parts = [self._one_call(lr[s]) for s in row_chunks(len(lr), latent_pixels, self.max_pixels)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def timed(self, lr: np.ndarray) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = self(lr)
        return time.perf_counter() - t0, out

    @property
    def label(self) -> str:
        return f"threads={self.threads or 'all'} spinning={self.spinning} lanes={self.lanes}"


def _config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def _config_int(model_dir: Path, key: str) -> int | None:
    params = _config(model_dir).parameters
    return int(params[key].string_value) if key in params else None


def served_lanes(repository: Path) -> str:
    """The lanes setting the served network models read (``cxr_sr.ort_cpu.lane_setting`` of
    the decoder's ``cpu_lanes`` parameter)."""
    params = _config(repository / NETWORKS[-1]).parameters
    return lane_setting(params["cpu_lanes"].string_value if "cpu_lanes" in params else None)


def served_thread_settings(repository: Path) -> dict[str, dict[str, str]]:
    """The onnxruntime settings each served network's config asks for (absent: the model's
    default: all cores, no spinning, no arena)."""
    out = {}
    for name in NETWORKS:
        params = _config(repository / name).parameters
        out[name] = {k: params[k].string_value for k in THREAD_PARAMETERS if k in params}
    return out


def calibrate(
    repository: Path,
    params: Mapping[str, Any],
    lr: np.ndarray,
    rounds: int,
    cores: int,
) -> tuple[InProcess, list[dict[str, Any]]]:
    """Time every candidate in-process setting on ``lr`` (interleaved, after one warm-up
    call each); returns the fastest (by median) and every candidate's timings."""
    # one thread has no pool to spin
    settings = [(1, "off")] + [(cores, mode) for mode in SPIN_MODES if cores > 1]
    candidates = [InProcess(repository, params, t, mode) for t, mode in settings]
    times: list[list[float]] = [[] for _ in candidates]
    for c in candidates:
        c(lr)
    for _ in range(rounds):
        for i, c in enumerate(candidates):
            times[i].append(c.timed(lr)[0])
    medians = [float(np.median(t)) * 1e3 for t in times]
    rows = [
        {"threads": c.threads, "spinning": c.spinning, "median_ms": m, "runs": len(t)}
        for c, m, t in zip(candidates, medians, times, strict=True)
    ]
    return candidates[int(np.argmin(medians))], rows


# ----------------------------------------------------------------- the cases


def enough_rounds(
    done: int, seconds: float, rounds: int, min_seconds: float, max_rounds: int | None
) -> bool:
    """Whether a case has its timed rounds: at least ``rounds``; past that, until the timed
    rounds took ``min_seconds`` or ``max_rounds`` were run."""
    if done < rounds:
        return False
    return seconds >= min_seconds or (max_rounds is not None and done >= max_rounds)


def run_case(
    url: str,
    inproc: InProcess,
    params: Mapping[str, Any],
    side: int,
    clients: int,
    rounds: int,
    warmup: int,
    seed: int,
    min_seconds: float = 0.0,
    max_rounds: int | None = None,
) -> dict[str, Any]:
    """One (LR side, concurrency) case, served and in-process rounds interleaved: ``rounds``
    timed pairs, then more until the timed pairs took ``min_seconds`` in all (at most
    ``max_rounds``), so a cheap case gets the rounds its noisier medians need."""
    lr = lr_crops(side, clients, seed=seed + side)
    calls = [grpc_call(url, lr[i : i + 1], params) for i in range(clients)]
    served_t: list[float] = []
    inproc_t: list[float] = []
    diff = None
    r = 0
    while not enough_rounds(
        len(served_t), sum(served_t) + sum(inproc_t), rounds, min_seconds, max_rounds
    ):
        ts, served = served_round(calls)
        ti, local = inproc.timed(lr)
        if r == 0:
            diff = float(np.abs(np.concatenate(served) - local).max())
        if r >= warmup:
            served_t.append(ts)
            inproc_t.append(ti)
        r += 1
    out_mp = (SCALE * side) ** 2 / 1e6
    served_ms = float(np.median(served_t)) * 1e3 / clients
    inproc_ms = float(np.median(inproc_t)) * 1e3 / clients
    return {
        "case": f"LR {side} x{clients}",
        "lr_side": side,
        "concurrency": clients,
        "output_mp": out_mp,
        "served_ms": served_ms,
        "inprocess_ms": inproc_ms,
        "ratio": served_ms / inproc_ms,
        "mp_per_s": out_mp / served_ms * 1e3,
        "inprocess_mp_per_s": out_mp / inproc_ms * 1e3,
        "rounds": len(served_t),
        "served_round_ms": [t * 1e3 for t in served_t],
        "inprocess_round_ms": [t * 1e3 for t in inproc_t],
        "max_abs_diff": diff,
    }


def run(
    url: str,
    inproc: InProcess,
    params: Mapping[str, Any],
    sizes: Sequence[int],
    concurrency: Sequence[int],
    *,
    rounds: int,
    warmup: int,
    seed: int = 0,
    min_seconds: float = 0.0,
    max_rounds: int | None = None,
) -> dict[str, Any]:
    """Every case against the server at ``url``; the report's payload (sizes the server does
    not take are skipped)."""
    low, high = served_sides(url)
    skipped = [s for s in sizes if not low <= s <= high]
    sizes = [s for s in sizes if low <= s <= high]
    if not sizes:
        raise RuntimeError(f"none of the sizes {skipped} is within the server's [{low}, {high}]")
    cases = []
    for side in sizes:
        for clients in concurrency:
            case = run_case(
                url, inproc, params, side, clients, rounds, warmup, seed, min_seconds, max_rounds
            )
            cases.append(case)
            print(
                f"[bench] {case['case']}: served {case['served_ms']:.0f} ms/image, in-process "
                f"{case['inprocess_ms']:.0f}, ratio {case['ratio']:.2f} ({case['rounds']} rounds)",
                flush=True,
            )
    return {"served_sides": [low, high], "skipped_sizes": skipped, "cases": cases}


def served_spinning(served: Mapping[str, Mapping[str, str]]) -> str:
    """The served networks' spin mode (``CXR_ORT_SPINNING`` where set, else their configs'
    ``intra_op_spinning``), or each network's where they differ."""
    modes = {n: spin_setting(s.get("intra_op_spinning")) for n, s in served.items()}
    if len(set(modes.values())) == 1:
        return next(iter(modes.values()))
    return ", ".join(f"{n} {m}" for n, m in modes.items())


def served_threads(choice: str, inproc: InProcess) -> int | None:
    """The intra-op threads the served network models get (``CXR_ORT_THREADS``, which they
    read where their config sets no ``intra_op_threads``): ``match`` = the calibrated
    in-process count, ``default`` = none given (the models' default: all cores), or a
    number."""
    if choice == "default":
        return None
    if choice == "match":
        return inproc.threads
    return int(choice)


def case_rows(cases: Sequence[Mapping[str, Any]], target: float) -> list[list[Any]]:
    return [
        [
            c["case"],
            c["served_ms"],
            c["inprocess_ms"],
            c["ratio"],
            "ok" if c["ratio"] <= target else "OVER",
            c["mp_per_s"],
            c["inprocess_mp_per_s"],
        ]
        for c in cases
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(
        "bench", __doc__, "built cpu repository: served, and its model.onnx files run in-process"
    )
    p.add_argument(
        "--url",
        default=None,
        help="gRPC host:port of a running server on that repository instead of starting one",
    )
    p.add_argument(
        "--sizes",
        type=positive_ints,
        default=list(DEFAULT_SIZES),
        help="LR sides, comma-separated (default: 64,128,256; output is 4x)",
    )
    p.add_argument(
        "--concurrency",
        type=positive_ints,
        default=list(DEFAULT_CONCURRENCY),
        help="client counts, comma-separated (default: 1,4)",
    )
    add_arguments(p, DEFAULT_PARAMETERS)  # one flag per request-schema key
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="timed rounds of each side per case, at least (default 5)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=20.0,
        help="more timed rounds until a case's timed rounds (both sides) took this long: a "
        "single round at LR 64-128 scatters by a third on shared cores, so cheap cases get "
        "more rounds (default %(default)s; 0: exactly --rounds)",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        default=40,
        help="at most this many timed rounds per case (default %(default)s)",
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds of each side first (default 1)"
    )
    p.add_argument(
        "--calibration-rounds",
        type=int,
        default=3,
        help="timed calls per in-process thread setting in the calibration (default 3)",
    )
    p.add_argument("--crop-seed", type=int, default=0, help="seed of the LR crops (default 0)")
    p.add_argument(
        "--served-threads",
        default="match",
        help="intra-op threads of the served network models: 'match' the calibrated "
        "in-process setting (default: the comparison then measures serving, not thread "
        "tuning), 'default' (as the repository is configured: all cores), or a number",
    )
    p.add_argument(
        "--target",
        type=float,
        default=TARGET_RATIO,
        help="served / in-process ratio to meet (default %(default)s)",
    )
    p.add_argument(
        "--check", action="store_true", help="exit 1 when a case's ratio exceeds --target"
    )
    p.add_argument(
        "--out", type=Path, default=Path("outputs/bench.json"), help="JSON report (%(default)s)"
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.calibration_rounds < 1:
        p.error("--rounds >= 1, --warmup >= 0 and --calibration-rounds >= 1 are required")
    if args.min_seconds < 0 or args.max_rounds < args.rounds:
        p.error("--min-seconds >= 0 and --max-rounds >= --rounds are required")
    if args.served_threads not in ("match", "default") and not args.served_threads.isdigit():
        p.error(f"--served-threads must be match, default or a number, got {args.served_threads!r}")
    if not args.repository.is_dir():
        p.error(f"--repository {args.repository} is not a folder: run `make build` first")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params = namespace_parameters(args)
    load_before = os.getloadavg()
    cores = device_info()["usable_cores"] or 1
    side = min(*args.sizes, CALIBRATION_MAX_SIDE)
    try:
        # in-process first, with the machine to itself: the fastest thread setting
        probe = lr_crops(side, 1, seed=args.crop_seed)
        calibration = calibrate(args.repository, params, probe, args.calibration_rounds, cores)
        inproc, candidates = calibration
        print(f"[bench] in-process: {inproc.label} (fastest of {len(candidates)})", flush=True)
        threads = served_threads(args.served_threads, inproc)
        measure = (inproc, params, args.sizes, args.concurrency)
        kwargs = {
            "rounds": args.rounds,
            "min_seconds": args.min_seconds,
            "max_rounds": args.max_rounds,
            "warmup": args.warmup,
            "seed": args.crop_seed,
        }
        if args.url:
            threads = None  # a running server keeps its own settings
            triton = server_version(args.url)
            report = run(args.url, *measure, **kwargs)
        else:
            from cxr_sr.builders.serve import TritonServer

            log = server_log(args.out)
            env_before = os.environ.get(THREADS_ENV)
            if threads is not None:
                os.environ[THREADS_ENV] = str(threads)  # the server's models inherit it
            try:
                with TritonServer(args.repository, log_file=log) as server:
                    triton = server_version(server.grpc_url)
                    report = run(server.grpc_url, *measure, **kwargs)
            finally:
                if env_before is None:
                    os.environ.pop(THREADS_ENV, None)
                else:
                    os.environ[THREADS_ENV] = env_before
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    load_after = os.getloadavg()

    device, versions = device_info(), software_versions(triton)
    cases = report["cases"]
    served = served_thread_settings(args.repository)
    print()
    print(
        f"{ENSEMBLE} served (intra-op threads {threads or 'as configured'}, spinning "
        f"{served_spinning(served)}) vs the same graphs in one process ({inproc.label}), "
        f"{', '.join(f'{k}={v}' for k, v in params.items())}; ms per image, median of "
        f"{args.rounds}-{args.max_rounds} interleaved rounds (at least {args.min_seconds:g} s "
        f"per case) after {args.warmup} warm-up"
    )
    print(describe(device, versions))
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    headers = ["case", "served ms", "in-proc ms", "ratio", f"<= {args.target:g}", "MP/s"]
    print(table([*headers, "in-proc MP/s"], case_rows(cases, args.target)))
    worst = max(c["ratio"] for c in cases)
    write_json(
        args.out,
        {
            "benchmark": "served vs in-process",
            "repository": str(args.repository),
            "url": args.url,
            "parameters": params,
            "rounds": args.rounds,
            "min_seconds": args.min_seconds,
            "max_rounds": args.max_rounds,
            "warmup": args.warmup,
            "target_ratio": args.target,
            "worst_ratio": worst,
            "load_average": {"before": list(load_before), "after": list(load_after)},
            "device": device,
            "versions": versions,
            "inprocess": {
                "threads": inproc.threads,
                "spinning": inproc.spinning,
                "lanes": inproc.lanes,
            },
            "calibration": {"lr_side": side, "candidates": candidates},
            "served_settings": {"intra_op_threads_env": threads, "config": served},
            **report,
        },
    )
    print(f"wrote {args.out}")
    return 1 if args.check and worst > args.target else 0


if __name__ == "__main__":
    sys.exit(main())
