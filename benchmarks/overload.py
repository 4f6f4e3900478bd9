"""Overload: where a flooded server refuses requests, and how much of its work gets served.

    python -m benchmarks.overload --repository build/model_repository_cpu --clients 320

Starts the embedded tritonserver on the repository (127.0.0.1, free ports) and floods
``cxr_sr`` with more clients than its queues hold: ``--clients`` threads, each sending one
LR image (real crops, ``--size``) after another for ``--duration-s`` seconds. A refused
request (UNAVAILABLE "Exceeds maximum queue size") is sent again after ``--backoff-s`` times
a random factor in [0.5, 1.5), as ``cxr-sr`` does. Triton's statistics before and after
the load give, per model of the pipeline, the images it ran and how many of them were
**discarded**: run for a request that a later queue then refused, so never served.

Prints and writes (``outputs/overload.json``) the goodput (served images/s, latency
percentiles of the served requests), the refusals, and per model the images run,
discarded, mean batch and queue time. Where requests are refused matters: a refusal at
``vae_encoder`` costs nothing, one at the sampler's queue costs an encoder run, one after
the sampler throws its UNet steps away. The builder puts the queue limits only where
requests are admitted (``vae_encoder`` and the sampler; the sampler alone in the chain
layout), so none of the sampler's work should be discarded.

Target (exit code 0): no image the sampler ran was discarded, and every failed request was
a queue refusal. Size ``--clients`` above what the queues hold (the published
``max_queue_size`` per admitting model: the default is 5x it) for refusals to happen at all.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    finish,
    grpc_inputs,
    lr_crops,
    server_log,
    server_version,
    software_versions,
    table,
)
from benchmarks.perf import DEFAULT_PARAMETERS, model_activity, model_statistics
from cxr_sr.builders.serve import TritonServer
from cxr_sr.builders.triton_config import DEFAULT_LIMITS

MODEL = "cxr_sr"
PIPELINE = ("vae_encoder", "sampler", "vae_decoder")  # in the order a request meets them
REFUSED = "Exceeds maximum queue size"
CLIENTS_PER_QUEUE_SLOT = 5  # the default --clients: this many per published queue slot


@dataclass
class Outcomes:
    """What the clients saw: served latencies (s), refusals, other errors by message."""

    latencies_s: list[float] = field(default_factory=list)
    refused: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, latency_s: float | None, error: str | None) -> bool:
        """Count one outcome; True when it was a queue refusal."""
        with self.lock:
            if error is None:
                self.latencies_s.append(latency_s)
            elif REFUSED in error:
                self.refused += 1
                return True
            else:
                self.errors[error[:200]] += 1
        return False


def flood(
    url: str,
    lr: np.ndarray,
    parameters: dict[str, Any],
    clients: int,
    duration_s: float,
    backoff_s: float,
    seed: int = 0,
) -> tuple[Outcomes, float]:
    """``clients`` threads sending ``lr``'s images [N, 1, H, W] in turn, one per request,
    until ``duration_s`` has passed; each waits out a refusal (``backoff_s`` times [0.5,
    1.5)). Returns the outcomes and the seconds until the last client finished (requests in
    flight at the deadline are waited for, so the server's counters settle)."""
    outcomes = Outcomes()
    start = time.monotonic()
    deadline = start + duration_s

    def client(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        triton = grpcclient.InferenceServerClient(url)
        i = k
        while time.monotonic() < deadline:
            inputs = grpc_inputs({"LR": lr[i % len(lr)][None]})
            i += clients
            sent = time.perf_counter()
            try:
                triton.infer(MODEL, inputs, parameters=parameters, client_timeout=600)
            except InferenceServerException as err:
                if outcomes.add(None, str(err.message())):
                    time.sleep(backoff_s * rng.uniform(0.5, 1.5))
                continue
            except Exception as err:  # noqa: BLE001 - a client-side failure is an outcome too
                outcomes.add(None, f"{type(err).__name__}: {err}")
                continue
            outcomes.add(time.perf_counter() - sent, None)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.monotonic() - start


def model_rows(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], served: int
) -> dict[str, dict[str, float | int | None]]:
    """Per model of :data:`PIPELINE` present in both snapshots: images it ran over the load,
    how many of them were ``discarded`` (ran, yet not served: a later queue refused them),
    executions, mean batch, queue ms per image, compute ms per image (the model's busy time,
    each batch once, over the images it ran: an image's share of its batch) and
    ``discarded_compute_s``, the share of that busy time the discarded images took."""
    activity = model_activity(before, after) or {}
    idle = {"requests": 0, "executions": 0, "mean_batch": None, "queue_ms": None, "busy_ms": None}
    rows = {}
    for name in PIPELINE:
        if name not in before or name not in after:
            continue
        done = activity.get(name, idle)  # a model that ran nothing is left out of activity
        discarded = max(0, done["requests"] - served)
        rows[name] = {
            "images": done["requests"],
            "discarded": discarded,
            "executions": done["executions"],
            "mean_batch": done["mean_batch"],
            "queue_ms": done["queue_ms"],
            "compute_ms": done["busy_ms"],
            "discarded_compute_s": discarded * (done["busy_ms"] or 0.0) / 1e3,
        }
    return rows


def summarise(
    outcomes: Outcomes, elapsed_s: float, models: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The report's figures and verdict from the clients' outcomes and :func:`model_rows`."""
    served = len(outcomes.latencies_s)
    ms = np.asarray(outcomes.latencies_s) * 1e3
    problems = []
    sampler = models.get("sampler")
    if sampler is None:
        problems.append("no statistics for the sampler")
    elif sampler["discarded"]:
        problems.append(
            f"{sampler['discarded']} of the {sampler['images']} images the sampler ran were "
            "refused after it (a queue limit after the UNet loop)"
        )
    if outcomes.errors:
        problems.append(f"{sum(outcomes.errors.values())} requests failed other than refused")
    notes = [] if outcomes.refused else ["nothing was refused: more --clients to overload"]
    return {
        "served": served,
        "refused": outcomes.refused,
        "other_errors": dict(outcomes.errors),
        "elapsed_s": elapsed_s,
        "served_img_s": served / elapsed_s if elapsed_s > 0 else None,
        "refused_per_s": outcomes.refused / elapsed_s if elapsed_s > 0 else None,
        "p50_ms": float(np.percentile(ms, 50)) if served else None,
        "p99_ms": float(np.percentile(ms, 99)) if served else None,
        "models": models,
        "problems": problems,
        "notes": notes,
        "passed": not problems,
    }


def settled_statistics(url: str, timeout_s: float = 5.0) -> dict[str, dict[str, int]] | None:
    """:func:`benchmarks.perf.model_statistics` once two reads 0.2 s apart agree: Triton counts
    a batch after its responses have gone, so the last batch may lag the clients' answers."""
    stats = model_statistics(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = model_statistics(url)
        if again == stats:
            break
        stats = again
    return stats


def published_queue_size(url: str) -> int | None:
    """The ``max_queue_size`` the server's ``cxr_sr`` publishes (None: unknown or 0)."""
    try:
        config = grpcclient.InferenceServerClient(url).get_model_config(MODEL, as_json=True)
        value = int(config["config"]["parameters"]["max_queue_size"]["string_value"])
    except (InferenceServerException, KeyError, ValueError):
        return None
    return value or None


def overload(
    repository: Path,
    *,
    clients: int | None,
    duration_s: float,
    backoff_s: float,
    size: int,
    images: int,
    parameters: dict[str, Any],
    log: Path | None = None,
) -> dict[str, Any]:
    """Serve ``repository``, warm it, flood it (:func:`flood`) and summarise (:func:`summarise`);
    ``clients`` None: :data:`CLIENTS_PER_QUEUE_SLOT` per published queue slot (the builder's
    default size without one)."""
    lr = lr_crops(size, images)
    with TritonServer(repository, log_file=log) as server:
        url = server.grpc_url
        triton = grpcclient.InferenceServerClient(url)
        for x in lr[:2]:  # warm every model at this size
            triton.infer(MODEL, grpc_inputs({"LR": x[None]}), parameters=parameters)
        queue = published_queue_size(url)
        clients = clients or CLIENTS_PER_QUEUE_SLOT * (queue or DEFAULT_LIMITS.max_queue_size)
        before = model_statistics(url)
        outcomes, elapsed = flood(url, lr, parameters, clients, duration_s, backoff_s)
        after = settled_statistics(url)
        triton_version = server_version(url)
    models = model_rows(before or {}, after or {}, len(outcomes.latencies_s))
    report = summarise(outcomes, elapsed, models)
    report.update(
        repository=repository.name,
        clients=clients,
        max_queue_size=queue,
        size=size,
        duration_s=duration_s,
        backoff_s=backoff_s,
        parameters=parameters,
        device=device_info(),
        versions=software_versions(triton_version),
    )
    return report


HEADERS = (
    "model",
    "images run",
    "discarded",
    "mean batch",
    "queue ms/image",
    "compute ms/image",
    "discarded compute s",
)


def rows(report: dict[str, Any]) -> list[list[Any]]:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return [
        [
            name,
            m["images"],
            m["discarded"],
            num(m["mean_batch"], ".2f"),
            num(m["queue_ms"], ".1f"),
            num(m["compute_ms"], ".1f"),
            num(m["discarded_compute_s"], ".1f"),
        ]
        for name, m in report["models"].items()
    ]


def parse_args(argv=None):
    p = benchmark_parser(
        "overload",
        __doc__,
        "built repository to serve",
        steps=DEFAULT_PARAMETERS["steps"],
        report="outputs/overload.json",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help=f"client threads (default: {CLIENTS_PER_QUEUE_SLOT}x the published max_queue_size)",
    )
    p.add_argument(
        "--duration-s", type=float, default=40.0, help="seconds of load (default: %(default)s)"
    )
    p.add_argument(
        "--backoff-s",
        type=float,
        default=0.5,
        help="a refused client's wait before it sends again, times [0.5, 1.5) "
        "(default: %(default)s)",
    )
    p.add_argument("--size", type=int, default=64, help="LR side (default: %(default)s)")
    p.add_argument(
        "--images", type=int, default=16, help="real LR crops sent in turn (default: %(default)s)"
    )
    args = p.parse_args(argv)
    if args.clients is not None and args.clients < 1:
        p.error("--clients must be >= 1")
    if not args.duration_s > 0 or not args.backoff_s >= 0:
        p.error("--duration-s must be > 0 and --backoff-s >= 0")
    if args.size < 1 or args.images < 1 or args.steps < 1:
        p.error("--size, --images and --steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(
        f"[overload] {args.repository}: {args.clients or 'default'} clients for "
        f"{args.duration_s:g} s, LR {args.size}, backoff {args.backoff_s:g} s",
        flush=True,
    )
    settings = {"duration_s": args.duration_s, "backoff_s": args.backoff_s, "size": args.size}
    parameters = {**DEFAULT_PARAMETERS, "steps": args.steps}
    try:
        report = overload(
            args.repository,
            clients=args.clients,
            images=args.images,
            parameters=parameters,
            log=server_log(args.out),
            **settings,
        )
    except (FileNotFoundError, RuntimeError, TimeoutError, InferenceServerException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(describe(report["device"], report["versions"]))
    print(
        f"{report['clients']} clients for {report['elapsed_s']:.0f} s (queues of "
        f"{report['max_queue_size'] or 'unlimited'}): {report['served']} served "
        f"({report['served_img_s']:.2f} img/s, p50 {report['p50_ms'] or 0:.0f} ms, p99 "
        f"{report['p99_ms'] or 0:.0f} ms), {report['refused']} refused, "
        f"{sum(report['other_errors'].values())} other errors"
    )
    print(table(HEADERS, rows(report)))
    for note in report["notes"]:
        print(f"note: {note}")
    passed = "nothing the sampler ran was discarded"
    return finish("overload", args.out, report, report["problems"], passed)


if __name__ == "__main__":
    sys.exit(main())
