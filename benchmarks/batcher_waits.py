"""Where requests wait in Triton's dynamic batchers: a load test with request tracing.

    python -m benchmarks.batcher_waits --repository build/model_repository_cpu \\
        --concurrency 4 --windows 4                          # serve, load, trace, report
    python -m benchmarks.batcher_waits --trace trace.json    # report on a trace you recorded

With ``--repository`` it serves the repository with the embedded tritonserver and Triton's
request tracing on (``--trace-config``: every request, level TIMESTAMPS), runs perf_analyzer
against ``cxr_sr`` (``--windows`` windows at ``--concurrency``, real LR crops of side
``--size``, as ``benchmarks.perf`` does), stops the server and reads the trace file it wrote.
``--trace`` reads a trace file recorded elsewhere (``cxr-sr-serve ... -- --trace-config
triton,file=trace.json --trace-config rate=1 --trace-config level=TIMESTAMPS``).

For every model in the trace (the sampler's BLS calls join their batch's first request's
trace, so the UNet is there too) it reports the batches it executed (the requests that share a
``COMPUTE_START``), how long requests waited in its queue, and **idle waits**: queue time
during which no batch of that model was executing. A dynamic batcher with a free instance
dispatches within its ``max_queue_delay_microseconds``, so an idle wait far beyond that is a
batcher that was not woken. For a model with a queue policy (a queue limit or a timeout: by
default the models where requests are admitted), Triton 2.51's batcher does not prefetch: a
new request wakes it only when an instance is waiting for work, so a request that arrives
while the model's only instance is still busy is picked up when the next request comes or
when the batcher thread's own timer runs out, half a second after it last found the queue
empty. Where client requests arrive at a model that is still busy (the cpu target's
``chain`` layout, whose sampler answers the clients itself), that timer shows as waits of
~500 ms. Without a queue policy (``builders.build --max-queue-size 0 --queue-timeout-s 0``)
the batcher forms the next batch while the instance is busy, and these waits are gone.

Writes ``outputs/batcher_waits.json`` (per model: counts, queue-time percentiles, each idle
wait longer than ``--min-idle-ms`` with its time, queue time and batch size) where a
client's request spends its time (median per step: queue and compute; the rest), and how many
batches of a network started while another network was executing (0 with the cpu target's
rate limiter, which runs one network at a time).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    DEFAULT_REPOSITORY,
    benchmark_parser,
    describe,
    device_info,
    server_version,
    software_versions,
    table,
    write_json,
)

TRACE_ARGS = ("rate=1", "level=TIMESTAMPS", "count=-1", "triton,log-frequency=0")
EXECUTED = frozenset({"QUEUE_START", "COMPUTE_START", "COMPUTE_END"})  # a model ran it


@dataclass
class Span:
    """One traced request: the model it ran on and its timestamps (ns)."""

    model: str | None = None
    parent: int | None = None
    ns: dict[str, int] = field(default_factory=dict)

    @property
    def executed(self) -> bool:
        """Whether a model queued and ran this request (an ensemble's own span has neither)."""
        return self.ns.keys() >= EXECUTED


@dataclass
class Batch:
    """Requests one model executed together, with their queue entry times (ns)."""

    start: int
    end: int
    queued: list[int]


def read_trace(path: str | Path) -> dict[int, Span]:
    """Triton's JSON trace file (a list of entries, each naming a trace id and either its
    model or some of its timestamps) as spans by trace id."""
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: not a Triton trace file (expected a JSON list)")
    spans: dict[int, Span] = collections.defaultdict(Span)
    for entry in entries:
        span = spans[entry["id"]]
        if "model_name" in entry:
            span.model = entry["model_name"]
            span.parent = entry.get("parent_id")
        for stamp in entry.get("timestamps", []):
            span.ns[stamp["name"]] = stamp["ns"]
    return dict(spans)


def model_batches(spans: Mapping[int, Span], model: str) -> list[Batch]:
    """The batches ``model`` executed, in order (requests sharing a COMPUTE_START)."""
    grouped: dict[int, list[Span]] = collections.defaultdict(list)
    for span in spans.values():
        if span.model == model and span.executed:
            grouped[span.ns["COMPUTE_START"]].append(span)
    return [
        Batch(start, max(s.ns["COMPUTE_END"] for s in group), [s.ns["QUEUE_START"] for s in group])
        for start, group in sorted(grouped.items())
    ]


NETWORKS = ("vae_encoder", "unet", "vae_decoder")  # the models that run onnxruntime


def overlapping_batches(spans: Mapping[int, Span], models: Sequence[str] = NETWORKS) -> int:
    """How many batches of ``models`` started while a batch of another of them was still
    executing: 0 when the networks run one at a time (the cpu target's rate limiter,
    ``builders.build --cpu-rate-limit``)."""
    batches = sorted((b.start, b.end, m) for m in models for b in model_batches(spans, m))
    count, running = 0, []  # (end, model) of the batches still executing
    for start, end, model in batches:
        running = [(e, m) for e, m in running if e > start]
        count += any(m != model for _, m in running)
        running.append((end, model))
    return count


def idle_ns(begin: int, end: int, busy: Sequence[tuple[int, int]]) -> int:
    """Time in [begin, end) covered by none of the ``busy`` intervals (sorted by start)."""
    idle, cursor = 0, begin
    for start, stop in busy:
        if stop <= cursor:
            continue
        if start >= end:
            break
        if start > cursor:
            idle += start - cursor
        cursor = max(cursor, stop)
        if cursor >= end:
            return idle
    return idle + max(0, end - cursor)


def request_breakdown(spans: Mapping[int, Span]) -> dict[str, Any] | None:
    """Where a client's request spends its time, median over the traced requests of an
    ensemble (a span whose steps name it as parent): per step, its queue and its compute time
    (ms), and the rest (``other_ms``: handing tensors between steps, the ensemble, the
    response) up to the request's end. Only clients' requests count (spans without a parent);
    a step's own BLS calls are part of its compute; the last step's compute ends a little
    after the ensemble answered (Triton sends the response first), so ``other_ms`` can be a
    fraction of a millisecond below 0. None when the trace holds no ensemble request."""
    steps: dict[int, list[Span]] = collections.defaultdict(list)
    for span in spans.values():
        if span.parent is not None and span.executed:
            steps[span.parent].append(span)
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for parent, children in steps.items():
        top = spans.get(parent)
        # clients' requests only (a sampler request is the parent of its BLS calls too)
        if top is None or top.parent is not None:
            continue
        if not {"REQUEST_START", "REQUEST_END"} <= set(top.ns):
            continue
        total = (top.ns["REQUEST_END"] - top.ns["REQUEST_START"]) / 1e6
        used = 0.0
        for child in sorted(children, key=lambda c: c.ns["QUEUE_START"]):
            queue = (child.ns["COMPUTE_START"] - child.ns["QUEUE_START"]) / 1e6
            compute = (child.ns["COMPUTE_END"] - child.ns["COMPUTE_START"]) / 1e6
            parts[f"{child.model} queue_ms"].append(queue)
            parts[f"{child.model} compute_ms"].append(compute)
            used += queue + compute
        parts["total_ms"].append(total)
        parts["other_ms"].append(total - used)
    if not parts:
        return None
    medians = {k: round(float(np.median(v)), 2) for k, v in parts.items()}
    return {"requests": len(parts["total_ms"]), **medians}


def analyse(spans: Mapping[int, Span], min_idle_ms: float = 50.0) -> dict[str, dict[str, Any]]:
    """Per model: batches, requests, mean batch, queue time p50/p99/max (ms) and the idle
    waits longer than ``min_idle_ms`` (ms from the first traced request)."""
    models = sorted({s.model for s in spans.values() if s.model})
    origin = min((s.ns["QUEUE_START"] for s in spans.values() if "QUEUE_START" in s.ns), default=0)
    report = {}
    for model in models:
        batches = model_batches(spans, model)
        if not batches:
            continue
        busy = [(b.start, b.end) for b in batches]
        queue_ms, waits = [], []
        for batch in batches:
            for queued in batch.queued:
                queue_ms.append((batch.start - queued) / 1e6)
            first = min(batch.queued)
            idle = idle_ns(first, batch.start, busy) / 1e6
            if idle > min_idle_ms:
                waits.append(
                    {
                        "at_ms": round((first - origin) / 1e6, 1),
                        "queued_ms": round((batch.start - first) / 1e6, 1),
                        "idle_ms": round(idle, 1),
                        "batch": len(batch.queued),
                    }
                )
        q = np.asarray(queue_ms)
        report[model] = {
            "batches": len(batches),
            "requests": len(queue_ms),
            "mean_batch": round(len(queue_ms) / len(batches), 2),
            "queue_ms": {
                "p50": round(float(np.percentile(q, 50)), 2),
                "p99": round(float(np.percentile(q, 99)), 2),
                "max": round(float(q.max()), 2),
            },
            "idle_waits": waits,
        }
    return report


def report_table(report: Mapping[str, Mapping[str, Any]], min_idle_ms: float) -> str:
    rows = []
    for model, r in report.items():
        waits = r["idle_waits"]
        longest = max((w["idle_ms"] for w in waits), default=0.0)
        q = r["queue_ms"]
        rows.append(
            [model, r["batches"], r["requests"], r["mean_batch"], q["p50"], q["p99"], q["max"],
             len(waits), longest]
        )  # fmt: skip
    headers = ["model", "batches", "requests", "mean batch", "queue p50 ms", "p99 ms",
               "max ms", f"idle waits > {min_idle_ms:g} ms", "longest ms"]  # fmt: skip
    return table(headers, rows)


def traced_load(args: argparse.Namespace, trace: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Serve ``args.repository`` with tracing into ``trace``, run the perf_analyzer windows,
    stop the server (Triton writes the trace file then). The perf results as dicts, and the
    server's Triton version."""
    from benchmarks.perf import PerfSettings, sweep
    from cxr_sr.builders.serve import TritonServer

    extra = ["--trace-config", f"triton,file={trace}"]
    for setting in TRACE_ARGS:
        extra += ["--trace-config", setting]
    settings = PerfSettings(measurement_ms=args.measurement_ms, max_trials=1)
    with TritonServer(args.repository, extra_args=extra) as server:
        triton = server_version(server.grpc_url)
        results = sweep(
            server.grpc_url,
            [args.concurrency] * args.windows,
            settings,
            sizes=[args.size],
            verbose=args.verbose,
        )
    windows = [
        {
            "window": i,
            "images_per_s": r.throughput,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
            "failed_requests": r.failed_requests,
            "error": r.error,
        }
        for i, r in enumerate(results)
    ]
    return windows, triton


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser("batcher_waits", __doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                        help="repository to serve and load (default: %(default)s)")  # fmt: skip
    source.add_argument("--trace", type=Path, default=None,
                        help="read this Triton trace file instead of running a load")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=4, help="clients (default: %(default)s)")
    p.add_argument("--windows", type=int, default=4,
                   help="perf_analyzer windows in a row (default: %(default)s)")  # fmt: skip
    p.add_argument("--measurement-ms", type=int, default=4000,
                   help="length of each window (default: %(default)s)")  # fmt: skip
    p.add_argument("--size", type=int, default=64, help="LR side (default: %(default)s)")
    p.add_argument("--min-idle-ms", type=float, default=50.0,
                   help="report idle waits longer than this (default: %(default)s)")  # fmt: skip
    p.add_argument("--keep-trace", type=Path, default=None,
                   help="with --repository: also copy Triton's trace file here")  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="print perf_analyzer's output")
    p.add_argument("--out", type=Path, default=Path("outputs/batcher_waits.json"),
                   help="JSON report (default: %(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    for name in ("concurrency", "windows", "measurement_ms", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.trace is not None and not args.trace.is_file():
        p.error(f"--trace {args.trace}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    triton = None
    perf: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxr-trace-") as tmp:
        trace = args.trace
        if trace is None:
            trace = Path(tmp) / "trace.json"
            perf, triton = traced_load(args, trace)
            if args.keep_trace is not None and trace.is_file():
                args.keep_trace.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(trace, args.keep_trace)
        try:
            spans = read_trace(trace)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: cannot read the trace {trace}: {err}", file=sys.stderr)
            return 1
    report = analyse(spans, args.min_idle_ms)
    breakdown = request_breakdown(spans)
    overlapping = overlapping_batches(spans)
    device, versions = device_info(), software_versions(triton)
    print(describe(device, versions))
    if perf:
        print(table(["window", "images/s", "p50 ms", "p99 ms", "failed"],
                    [[w["window"], w["images_per_s"], w["p50_ms"], w["p99_ms"],
                      w["failed_requests"]] for w in perf]))  # fmt: skip
    print(report_table(report, args.min_idle_ms))
    for model, r in report.items():
        for w in r["idle_waits"]:
            print(f"  {model}: batch of {w['batch']} at {w['at_ms']} ms queued "
                  f"{w['queued_ms']} ms, {w['idle_ms']} ms of it with {model} idle")  # fmt: skip
    print(f"network batches started while another network was executing: {overlapping}")
    if breakdown:
        print(f"a request's time, median of {breakdown['requests']} (ms):")
        print(table(["part", "ms"], [[k.removesuffix("_ms"), v] for k, v in breakdown.items()
                                     if k != "requests"]))  # fmt: skip
    payload = {
        "benchmark": "batcher_waits",
        "source": str(args.trace) if args.trace else str(args.repository),
        "settings": {
            "concurrency": args.concurrency,
            "windows": args.windows,
            "measurement_ms": args.measurement_ms,
            "lr_side": args.size,
            "min_idle_ms": args.min_idle_ms,
        }
        if args.trace is None
        else {"min_idle_ms": args.min_idle_ms},
        "device": device,
        "versions": versions,
        "perf": perf,
        "models": report,
        "overlapping_network_batches": overlapping,
        "request_breakdown": breakdown,
    }
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
