"""Resident memory and latency of the onnxruntime model processes under each memory setting.

    python -m benchmarks.ort_memory --repository build/model_repository_cpu

For each setting of the config parameters ``ort_cpu_mem_arena`` and ``ort_mem_pattern``
(``model_repository/onnx_python/model.py``), side by side in one run: copies the repository,
sets them on every onnxruntime model, starts the embedded tritonserver, sends the same
requests (batch 8 at LR 64, as in the first report of 1+ GB processes, then the largest LR
side the server takes, batch 1, then a batch of 4 at half that side; each twice, the second
timed) and samples the RSS of every process throughout (``benchmarks.soak``). Prints the peak
and final RSS per process and the latencies; writes ``outputs/ort_memory.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    lr_crops,
    software_versions,
    table,
    write_json,
)
from benchmarks.soak import MemorySampler, server_processes
from cxr_sr.builders.serve import TritonServer
from cxr_sr.builders.triton_config import read_config, write_config
from cxr_sr.client.triton import SRClient

# (arena, memory patterns): onnxruntime's defaults first, the build's default third
SETTINGS = ((True, True), (False, True), (True, False), (False, False))
ORT_MODELS = ("vae_encoder", "unet", "vae_decoder")


def configure(src: Path, dst: Path, arena: bool, pattern: bool) -> Path:
    """A copy of the repository ``src`` at ``dst`` with the two settings on every ORT model."""
    shutil.copytree(src, dst)
    for name in ORT_MODELS:
        config = read_config(dst / name / "config.pbtxt")
        config.parameters["ort_cpu_mem_arena"].string_value = str(arena).lower()
        config.parameters["ort_mem_pattern"].string_value = str(pattern).lower()
        write_config(config, dst / name)
    return dst


def workload(max_side: int) -> list[tuple[str, Any]]:
    """(label, LR batch) in the order sent: the issue's case, the largest side, a mixed one."""
    half = max(16, max_side // 2)
    return [
        ("8 x LR 64", lr_crops(64, 8, seed=1)),
        (f"1 x LR {max_side}", lr_crops(max_side, 1, seed=2)),
        (f"4 x LR {half}", lr_crops(half, 4, seed=3)),
    ]


def measure(repository: Path, arena: bool, pattern: bool, log: Path | None) -> dict[str, Any]:
    """One setting: peak / final RSS per process (MiB) and seconds per request kind."""
    latency = {}
    with TritonServer(repository, log_file=log) as server:
        sampler = MemorySampler(server_processes(server.process.pid), 0.5)
        sampler.start()
        try:
            with SRClient(server.http_url, timeout_s=900) as client:
                for label, lr in workload(client.limits().max_side):
                    client.super_resolve(lr, steps=1, seed=0)
                    t0 = time.perf_counter()
                    client.super_resolve(lr, steps=1, seed=0)
                    latency[label] = time.perf_counter() - t0
        finally:
            sampler.stop()
    names = list(sampler.samples[0][1])
    peak = {n: max(m[n] or 0.0 for _, m in sampler.samples) for n in names}
    final = dict(sampler.samples[-1][1])
    return {
        "ort_cpu_mem_arena": arena,
        "ort_mem_pattern": pattern,
        "peak_mib": peak,
        "final_mib": final,
        "latency_s": latency,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser("ort_memory", __doc__, "built cpu-target repository")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/ort_memory.json"),
        help="report file (default: %(default)s)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.repository / "unet" / "1" / "model.py").is_file():
        print(f"error: {args.repository} is not a cpu-target repository", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="cxr-ortmem-") as tmp:
        for arena, pattern in SETTINGS:
            repo = configure(args.repository, Path(tmp) / f"a{arena:d}p{pattern:d}", arena, pattern)
            print(f"[ort_memory] arena {arena}, memory patterns {pattern} ...", flush=True)
            results.append(measure(repo, arena, pattern, Path(tmp) / "triton.log"))
    versions = software_versions()
    device = device_info()
    print(describe(device, versions))
    procs = list(results[0]["peak_mib"])
    labels = list(results[0]["latency_s"])
    headers = [
        "arena",
        "patterns",
        *(f"{p} peak/end MiB" for p in procs),
        *(f"{x} s" for x in labels),
    ]
    rows = [
        [
            "on" if r["ort_cpu_mem_arena"] else "off",
            "on" if r["ort_mem_pattern"] else "off",
            *(f"{r['peak_mib'][p]:.0f}/{r['final_mib'][p] or 0:.0f}" for p in procs),
            *(round(r["latency_s"][x], 2) for x in labels),
        ]
        for r in results
    ]
    print(table(headers, rows))
    write_json(
        args.out,
        {
            "benchmark": "ort_memory",
            "repository": str(args.repository),
            "device": device,
            "versions": versions,
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
