"""Cost per megapixel through the server: latency, output megapixels per second and the
resident memory of every model process, by LR size.

    python -m benchmarks.cost --repository build/model_repository_cpu --sizes 64,128,256

Starts the embedded tritonserver on the repository (127.0.0.1, free ports), or uses a running
one (``--url``, gRPC; then process memory is read only with ``--server-pid``), and reads the
LR sides it serves from the ensemble's config (``lr_min_side``, ``lr_max_side``). For each LR
side of ``--sizes`` (sides above the server's maximum are reported as skipped, and the
maximum itself is always measured), real LR crops of that size (native scale,
``benchmarks.common.lr_crops``) go to ``cxr_sr`` over gRPC, batch 1, with the sampling flags
as request parameters:

- latency: ``--warmup`` untimed, then ``--runs`` timed requests one after another (median, p90);
- output megapixels per second: (4H x 4W / 1e6) / median latency, and ms per output MP;
- throughput: ``--concurrency`` clients at once, output MP per second of wall time.

After each size the resident memory (VmRSS) and its peak so far (VmHWM) of the tritonserver
process and of every Python-backend stub (one per model instance) are read from /proc; the
table shows them at the largest size. Writes ``outputs/cost.json`` with device and versions.

The client side adds its rows (a 512x512 image through the client's tiling) in
:func:`client_tiling_rows`, timed with :func:`time_case` like the server rows.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    lr_crops,
    positive_ints,
    server_log,
    server_version,
    software_versions,
    table,
    write_json,
)
from cxr_sr.builders.specs import ENSEMBLE
from cxr_sr.imaging import SCALE
from cxr_sr.serving import add_arguments, namespace_parameters

DEFAULT_SIZES = (64, 128, 256)
DEFAULT_PARAMETERS = {"steps": 1, "seed": 0}  # 1 step: the demo checkpoint's default
STUB = "triton_python_backend_stub"


# ----------------------------------------------------------------- timing


def time_case(
    name: str,
    fn: Callable[[], Any],
    output_pixels: int,
    runs: int,
    warmup: int,
    **extra: Any,
) -> dict[str, Any]:
    """One row of the table: ``warmup`` untimed calls of ``fn``, then ``runs`` timed ones.

    ``output_pixels``: pixels ``fn`` returns per call (SR pixels). The row holds the median
    and p90 latency in ms, output megapixels per second at the median and ms per output MP.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    mp = output_pixels / 1e6
    return {
        "case": name,
        "output_mp": mp,
        "latency_ms": median * 1e3,
        "p90_ms": float(np.percentile(times, 90)) * 1e3,
        "mp_per_s": mp / median,
        "ms_per_mp": median * 1e3 / mp,
        "runs": runs,
        **extra,
    }


def concurrent_mp_per_s(
    make_call: Callable[[int], Callable[[], Any]], output_pixels: int, clients: int, requests: int
) -> float:
    """Output MP per second of wall time with ``clients`` threads sending ``requests`` in all;
    ``make_call(i)`` gives client ``i`` its own call (its own connection)."""
    calls = [make_call(i) for i in range(clients)]
    counts = [requests // clients + (i < requests % clients) for i in range(clients)]

    def worker(i: int) -> None:
        for _ in range(counts[i]):
            calls[i]()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return requests * output_pixels / 1e6 / (time.perf_counter() - t0)


def grpc_call(url: str, lr: np.ndarray, params: Mapping[str, Any]) -> Callable[[], np.ndarray]:
    """A callable sending ``lr`` to ``cxr_sr`` over gRPC (its own connection) -> SR."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("LR", list(lr.shape), "FP32")
    x.set_data_from_numpy(np.ascontiguousarray(lr, dtype=np.float32))
    out = [grpcclient.InferRequestedOutput("SR")]
    return lambda: client.infer(ENSEMBLE, [x], outputs=out, parameters=dict(params)).as_numpy("SR")


def served_sides(url: str) -> tuple[int, int]:
    """(smallest, largest) LR side the server's ``cxr_sr`` takes (its config parameters)."""
    import tritonclient.grpc as grpcclient

    config = grpcclient.InferenceServerClient(url).get_model_config(ENSEMBLE, as_json=True)
    params = config["config"].get("parameters", {})
    try:
        return tuple(int(params[k]["string_value"]) for k in ("lr_min_side", "lr_max_side"))
    except KeyError:
        raise RuntimeError(
            f"{ENSEMBLE} at {url} publishes no lr_min_side/lr_max_side: a repository built "
            "before any-size serving; rebuild it with `python -m cxr_sr.builders.build`"
        ) from None


# ----------------------------------------------------------------- memory


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _kib(value: str) -> float:
    return float(value.split()[0]) / 1024.0  # "123456 kB" -> MiB


def process_memory(server_pid: int) -> list[dict[str, Any]]:
    """VmRSS and VmHWM (peak) in MiB of the tritonserver process and each of its Python stubs,
    named by model instance (the stub's command line names it, e.g. ``unet_0_0``)."""
    rows = []
    candidates = [server_pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_status(int(entry.name))["PPid"]) == server_pid:
                    candidates.append(int(entry.name))
            except (OSError, KeyError, ValueError):
                continue
    for pid in candidates:
        try:
            status = _status(pid)
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        args = [a.decode(errors="replace") for a in argv if a]
        if pid == server_pid:
            name = "tritonserver"
        elif len(args) > 1 and Path(args[0]).name == STUB:
            model = Path(args[1]).parent.parent.name  # <repository>/<model>/<version>/model.py
            name = next((a for a in args[2:] if a.startswith(f"{model}_")), model)
        else:
            continue
        rows.append(
            {
                "process": name,
                "pid": pid,
                "rss_mib": _kib(status["VmRSS"]),
                "peak_mib": _kib(status.get("VmHWM", status["VmRSS"])),
            }
        )
    return sorted(rows, key=lambda r: (r["process"] != "tritonserver", r["process"]))


# ----------------------------------------------------------------- the hook for the client


def client_tiling_rows(
    url: str, params: Mapping[str, Any], runs: int, warmup: int
) -> list[dict[str, Any]]:
    """Rows measured through the client (issue 9, item 5): a 512x512 input through the
    client's tiling, :func:`benchmarks.tiling.tiling_rows` (owned by the client side)."""
    # imported here: benchmarks.tiling imports time_case from this module
    from benchmarks.tiling import tiling_rows

    return tiling_rows(url, params, runs, warmup)


# ----------------------------------------------------------------- the benchmark


def sizes_to_measure(requested: Sequence[int], low: int, high: int) -> tuple[list[int], list]:
    """(sides to measure: the requested ones the server takes, plus its largest side; the
    skipped ones with the reason)."""
    measure = sorted({s for s in requested if low <= s <= high} | {high})
    skipped = [
        {"lr_side": s, "reason": f"outside the server's LR sides [{low}, {high}]"}
        for s in requested
        if not low <= s <= high
    ]
    return measure, skipped


def run(
    url: str,
    sizes: Sequence[int],
    params: Mapping[str, Any],
    *,
    runs: int,
    warmup: int,
    concurrency: int,
    server_pid: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every measurement against the server at ``url``; the report's payload."""
    low, high = served_sides(url)
    measure, skipped = sizes_to_measure(sizes, low, high)
    idle = process_memory(server_pid) if server_pid else []
    rows, memory = [], {}
    for side in measure:
        lr = lr_crops(side, 1, seed=seed + side)
        pixels = (SCALE * side) ** 2
        row = time_case(
            f"LR {side} -> {SCALE * side}",
            grpc_call(url, lr, params),
            pixels,
            runs,
            warmup,
            lr_side=side,
            path="server",
        )
        if concurrency > 1:
            requests = max(runs, 2 * concurrency)
            row[f"mp_per_s_c{concurrency}"] = concurrent_mp_per_s(
                lambda i, lr=lr: grpc_call(url, lr, params), pixels, concurrency, requests
            )
        rows.append(row)
        print(
            f"[cost] LR {side}: {row['latency_ms']:.0f} ms, {row['mp_per_s']:.2f} MP/s",
            flush=True,
        )
        if server_pid:
            memory[str(side)] = process_memory(server_pid)
    rows += client_tiling_rows(url, params, runs, warmup)
    return {
        "served_sides": [low, high],
        "rows": rows,
        "skipped": skipped,
        "memory": {"idle": idle, **memory},
        "max_side": high,
    }


def memory_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    """(process, RSS idle, RSS at the max size, peak) in MiB, one row per process."""
    at_max = report["memory"].get(str(report["max_side"]), [])
    idle = {m["process"]: m["rss_mib"] for m in report["memory"].get("idle", [])}
    rows = [[m["process"], idle.get(m["process"]), m["rss_mib"], m["peak_mib"]] for m in at_max]
    total = [sum(r[i] or 0.0 for r in rows) for i in (1, 2, 3)]
    return [*rows, ["all", *total]] if rows else []


def cost_rows(report: Mapping[str, Any], concurrency: int) -> list[list[Any]]:
    key = f"mp_per_s_c{concurrency}"
    return [
        [
            r["case"],
            r["output_mp"],
            r["latency_ms"],
            r["p90_ms"],
            r["mp_per_s"],
            r.get(key),
            r["ms_per_mp"],
        ]
        for r in report["rows"]
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(
        "cost", __doc__, "built repository to serve with the embedded tritonserver"
    )
    p.add_argument("--url", default=None, help="gRPC host:port of a running server instead")
    p.add_argument(
        "--server-pid", type=int, default=None, help="with --url: tritonserver's pid (memory)"
    )
    p.add_argument(
        "--sizes",
        type=positive_ints,
        default=list(DEFAULT_SIZES),
        help="LR sides, comma-separated (default: 64,128,256; output is 4x)",
    )
    add_arguments(p, DEFAULT_PARAMETERS)  # one flag per request-schema key
    p.add_argument("--runs", type=int, default=5, help="timed requests per size (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests first (default 2)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="clients at once for the throughput column (1: none; default 2)",
    )
    p.add_argument("--crop-seed", type=int, default=0, help="seed of the LR crops (default 0)")
    p.add_argument(
        "--out", type=Path, default=Path("outputs/cost.json"), help="JSON report (%(default)s)"
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.concurrency < 1:
        p.error("--runs >= 1, --warmup >= 0 and --concurrency >= 1 are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params = namespace_parameters(args)
    kwargs = {
        "runs": args.runs,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "seed": args.crop_seed,
    }
    try:
        if args.url:
            triton = server_version(args.url)
            report = run(args.url, args.sizes, params, server_pid=args.server_pid, **kwargs)
        else:
            from cxr_sr.builders.serve import TritonServer

            log = server_log(args.out)
            with TritonServer(args.repository, log_file=log) as server:
                triton = server_version(server.grpc_url)
                report = run(
                    server.grpc_url, args.sizes, params, server_pid=server.process.pid, **kwargs
                )
    except (FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    device, versions = device_info(), software_versions(triton)
    print()
    low, high = report["served_sides"]
    print(
        f"cost per megapixel through {ENSEMBLE}: batch 1, gRPC, "
        f"{', '.join(f'{k}={v}' for k, v in params.items())}, median of {args.runs} after "
        f"{args.warmup} warm-up; the server takes LR sides {low}-{high}"
    )
    print(describe(device, versions))
    headers = ["case", "out MP", "median ms", "p90 ms", "MP/s", f"MP/s x{args.concurrency}"]
    print(table([*headers, "ms / MP"], cost_rows(report, args.concurrency)))
    for s in report["skipped"]:
        print(f"LR {s['lr_side']}: skipped ({s['reason']})")
    rows = memory_rows(report)
    if rows:
        print()
        print(f"resident memory (MiB) of each model process, idle and after LR {high}:")
        print(table(["process", "RSS idle", f"RSS at LR {high}", "peak"], rows))
    write_json(
        args.out,
        {
            "benchmark": "cost",
            "repository": None if args.url else str(args.repository),
            "url": args.url,
            "parameters": params,
            "batch": 1,
            "runs": args.runs,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "device": device,
            "versions": versions,
            **report,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
