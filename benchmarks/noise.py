"""What the sampling noise costs on the host, drawn in one thread and in several.

    python -m benchmarks.noise --out outputs/noise.json

The sampler draws each row's start noise on the CPU (``cxr_sr.noise``: a PCG64 stream per
64x64 latent block, so that tiles agree and outputs never depend on batching). On a GPU the
loop waits for it: a batch of 64 rows at LR 64 is ~20 ms of one core, more than the GPU
spends on the batch's networks. ``cxr_sr.noise.draw_noise`` therefore draws the blocks of a
large batch in a thread pool (numpy's generators release the GIL). This times, side by side
in one process, interleaved call by call, one thread against ``--threads`` (default: what
the sampler would use here), for each batch size and LR side, and checks that both give the
same noise bit for bit. Milliseconds per batch (median of ``--repeats``) and per row.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    positive_ints,
    software_versions,
    table,
    write_json,
)
from cxr_sr.imaging import SCALE
from cxr_sr.noise import RowNoise, draw_noise, legacy_block, noise_keys, noise_threads

LATENT_CHANNELS = 4
VAE_FACTOR = 4  # the demo VAE's: latent side = LR side


def time_case(batch: int, side: int, threads: Sequence[int], repeats: int) -> dict[str, object]:
    """Median ms per batch for each thread count (interleaved), and whether they agree."""
    latent = side * SCALE // VAE_FACTOR
    shape = (LATENT_CHANNELS, latent, latent)
    keys = noise_keys(list(range(batch)), [1] * batch, block=legacy_block(VAE_FACTOR))
    times: dict[int, list[float]] = {n: [] for n in threads}
    results: dict[int, np.ndarray] = {}
    for _ in range(repeats + 1):  # the first round warms the pool and the allocator
        for n in threads:
            rows = [RowNoise(k) for k in keys]  # fresh cursors: every call draws anew
            start = time.perf_counter()
            results[n] = draw_noise(rows, 0, shape, threads=n)
            times[n].append(time.perf_counter() - start)
    ms = {n: statistics.median(t[1:]) * 1e3 for n, t in times.items()}
    first = results[threads[0]]
    return {
        "batch": batch,
        "lr_side": side,
        "latent_shape": list(shape),
        "ms": {str(n): v for n, v in ms.items()},
        "speedup": ms[threads[0]] / ms[threads[-1]],
        "identical": all(np.array_equal(first, r) for r in results.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = benchmark_parser("noise", __doc__)
    p.add_argument("--batches", type=positive_ints, default=[1, 16, 64], help="rows per batch")
    p.add_argument("--sizes", type=positive_ints, default=[64, 128, 256], help="LR sides")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads against one (default: the sampler's, one per usable core, at most 8)",
    )
    p.add_argument("--repeats", type=int, default=9, help="timed calls per case and thread count")
    p.add_argument("--out", default="outputs/noise.json", help="JSON report")
    args = p.parse_args(argv)
    threads = noise_threads() if args.threads is None else args.threads
    if threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be at least 1")
    counts = [1] if threads == 1 else [1, threads]
    cases = [time_case(b, s, counts, args.repeats) for s in args.sizes for b in args.batches]
    device, versions = device_info(), software_versions()
    print(describe(device, versions))
    headers = ["LR", "batch", *(f"{n} thread{'s' * (n > 1)} ms" for n in counts)]
    headers += ["ms per row", "speedup", "identical"]
    rows = [
        [
            c["lr_side"],
            c["batch"],
            *(c["ms"][str(n)] for n in counts),
            c["ms"][str(counts[-1])] / c["batch"],
            f"{c['speedup']:.2f}x",
            c["identical"],
        ]
        for c in cases
    ]
    print(table(headers, rows))
    report = {
        "benchmark": "noise",
        "device": device,
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
        "threads": counts,
        "cases": cases,
    }
    print(f"wrote {write_json(args.out, report)}")
    return 0 if all(c["identical"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
