"""What spreading a batch over parallel onnxruntime calls buys on the CPU (``cpu_lanes``).

    python -m benchmarks.lanes --repository build/model_repository_cpu --out outputs/lanes.json

The cpu target's network models run a dynamic batch of several images as ``lanes`` parallel
calls with a share of the intra-op threads each, instead of one call with all of them
(``cxr_sr.ort_cpu``). This times the served pipeline in one process (``benchmarks.bench``'s
in-process side: encoder, the sampling loop over the UNet, decoder, the repository's graphs,
calls no larger than the served ``max_batch_pixels``) with one lane against ``--lanes``, the
same intra-op threads (``--threads``, default one per usable core), interleaved call by call,
for each LR side and batch size, and checks that both give the same SR (to float rounding).
Milliseconds per image (median of ``--repeats``); a batch of one runs the same way in both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.bench import InProcess
from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    lr_crops,
    positive_ints,
    software_versions,
    table,
    write_json,
)
from cxr_sr.host import usable_cores

TOLERANCE = 1e-5  # rows are independent of their batch: float rounding only


def time_case(pipes: dict[int, InProcess], side: int, batch: int, repeats: int) -> dict:
    """Median ms per image for each lane count (interleaved, after one warm-up call each)
    and the largest SR difference between them."""
    lr = lr_crops(side, batch, seed=side + batch)
    times: dict[int, list[float]] = {n: [] for n in pipes}
    out: dict[int, np.ndarray] = {}
    for n, pipe in pipes.items():
        out[n] = pipe(lr)
    for _ in range(repeats):
        for n, pipe in pipes.items():
            times[n].append(pipe.timed(lr)[0])
    ms = {n: statistics.median(t) * 1e3 / batch for n, t in times.items()}
    first, last = min(pipes), max(pipes)
    return {
        "lr_side": side,
        "batch": batch,
        "ms_per_image": {str(n): v for n, v in ms.items()},
        "speedup": ms[first] / ms[last],
        "max_abs_diff": float(np.abs(out[first] - out[last]).max()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = benchmark_parser("lanes", __doc__, repository="the built cpu repository")
    p.add_argument("--sizes", type=positive_ints, default=[64, 128], help="LR sides")
    p.add_argument("--batches", type=positive_ints, default=[1, 2, 3, 4], help="images per call")
    p.add_argument("--lanes", type=int, default=2, help="lanes against one (default: 2)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: usable cores)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case and setting")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (default: 1)")
    p.add_argument("--out", default="outputs/lanes.json", help="JSON report")
    args = p.parse_args(argv)
    if args.lanes < 2 or args.repeats < 1 or args.threads < 0 or args.steps < 1:
        p.error("--lanes must be at least 2, --repeats and --steps at least 1, --threads >= 0")
    threads = args.threads or usable_cores()
    params = {"steps": args.steps, "seed": 0}
    try:
        pipes = {
            n: InProcess(args.repository, params, threads, spinning="off", lanes=n)
            for n in (1, args.lanes)
        }
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}")
        return 1
    cases = []
    for side in args.sizes:
        for batch in args.batches:
            cases.append(time_case(pipes, side, batch, args.repeats))
            c = cases[-1]
            print(f"[lanes] LR {side} batch {batch}: {c['speedup']:.2f}x", flush=True)
    device, versions = device_info(), software_versions()
    print(describe(device, versions))
    print(f"intra-op threads {threads}, {args.steps} step(s), ms per image, in one process")
    lanes = (1, args.lanes)
    headers = ["LR", "batch", *(f"{n} lane{'s' * (n > 1)} ms" for n in lanes)]
    rows = [
        [
            c["lr_side"],
            c["batch"],
            *(c["ms_per_image"][str(n)] for n in lanes),
            f"{c['speedup']:.2f}x",
            c["max_abs_diff"],
        ]
        for c in cases
    ]
    print(table([*headers, "speedup", "max abs diff"], rows))
    report = {
        "benchmark": "lanes",
        "repository": str(args.repository),
        "device": device,
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
        "threads": threads,
        "lanes": list(lanes),
        "parameters": params,
        "cases": cases,
    }
    print(f"wrote {write_json(args.out, report)}")
    return 0 if all(c["max_abs_diff"] <= TOLERANCE for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
